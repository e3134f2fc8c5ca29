"""Model families, versions and package downloads (read-only, any valid token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse

from ..auth import Principal
from ..crud import families, family_info, get_family, get_version, version_info, versions
from ..db import MAX_INTEGER
from ..deps import FamilyName, VersionRef, current_principal, get_storage
from ..schemas import FamilyInfo, PackageInfo, VersionInfo
from ..storage import Storage

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=list[FamilyInfo])
def list_families(_: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return [family_info(session, f) for f in families(session)]


@router.get("/models/{family}", response_model=FamilyInfo, responses={404: {"description": "unknown family"}})
def show_family(family: str = FamilyName, _: Principal = Depends(current_principal),
                storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return family_info(session, get_family(session, family))


@router.get("/models/{family}/versions", response_model=list[VersionInfo],
            responses={404: {"description": "unknown family"}})
def list_versions(family: str = FamilyName, _: Principal = Depends(current_principal),
                  storage: Storage = Depends(get_storage),
                  limit: int = Query(100, ge=1, le=1000, description="at most this many, the newest"),
                  before: int | None = Query(None, ge=1, le=MAX_INTEGER,
                                             description="only versions numbered below this (the next page)")):
    """The newest ``limit`` versions (below ``before``), oldest first; page back with ``before`` set to
    the first number returned."""
    with storage.read() as session:
        fam = get_family(session, family)
        return [version_info(v, fam) for v in versions(session, family, limit, before)]


@router.get("/models/{family}/versions/{version}/package", response_model=PackageInfo,
            responses={404: {"description": "unknown family or version"}})
def package(request: Request, response: Response, family: str = FamilyName, version: str = VersionRef,
            _: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    """The manifest of a version; weights at ``weights_url`` (immutable, so cacheable by ETag)."""
    with storage.read() as session:
        row = get_version(session, get_family(session, family), version)
    response.headers["ETag"] = f'"{row.weights_sha256}"'
    return PackageInfo(family=family, version=row.number, manifest=row.manifest,
                       weights_url=str(request.url_for("weights", family=family, version=str(row.number)).path),
                       weights_sha256=row.weights_sha256, weights_size=row.weights_size)


@router.get("/models/{family}/versions/{version}/weights", name="weights",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a byte range"},
                       304: {"description": "not modified"}, 404: {"description": "unknown family or version"}})
def weights(request: Request, family: str = FamilyName, version: str = VersionRef,
            _: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    """The safetensors weights, with ``ETag`` = sha256 and byte ranges for resuming."""
    with storage.read() as session:
        row = get_version(session, get_family(session, family), version)
    etag = f'"{row.weights_sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    # A numbered version never changes; "active" moves with every merge and rollback: ask again each time.
    caching = "no-cache" if version == "active" else "private, max-age=31536000, immutable"
    return FileResponse(storage.blobs.path(row.weights_sha256), media_type="application/octet-stream",
                        headers={"ETag": etag, "X-Content-SHA256": row.weights_sha256, "Cache-Control": caching})
