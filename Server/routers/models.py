"""Model families, versions and package downloads (read-only, any valid token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..auth import Principal
from ..db import Family, UpdateRow, Version
from ..deps import current_principal, get_storage
from ..schemas import FamilyInfo, PackageInfo, VersionInfo
from ..storage import Storage

router = APIRouter(prefix="/v1", tags=["models"])
FamilyName = Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length=64)
VersionRef = Path(pattern=r"^(active|[0-9]{1,9})$", description="a version number or `active`")


def get_family(session: Session, name: str) -> Family:
    family = session.get(Family, name)
    if family is None:
        raise HTTPException(404, f"no model family {name!r}")
    return family


def get_version(session: Session, family: Family, ref: str) -> Version:
    number = family.active_version if ref == "active" else int(ref)
    version = session.scalar(select(Version).where(Version.family == family.name, Version.number == number))
    if version is None:
        raise HTTPException(404, f"{family.name} has no version {ref}")
    return version


def version_info(version: Version, family: Family) -> VersionInfo:
    return VersionInfo(family=version.family, number=version.number, parent=version.parent_number,
                       source=version.source, created_at=version.created_at,
                       weights_sha256=version.weights_sha256, weights_size=version.weights_size,
                       validation_mean_dice=version.validation.get("mean"),
                       active=version.number == family.active_version)


def family_info(session: Session, family: Family) -> FamilyInfo:
    active = get_version(session, family, "active") if family.active_version is not None else None
    labels = [m["name"] for m in active.manifest.get("labels", {}).get("muscles", [])] if active else []
    buffered = session.scalar(select(func.count()).select_from(UpdateRow).where(
        UpdateRow.family == family.name, UpdateRow.status == "buffered"))
    return FamilyInfo(name=family.name, region=family.region, active_version=family.active_version,
                      labels=labels, buffered_updates=buffered or 0)


@router.get("/models", response_model=list[FamilyInfo])
def list_families(_: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return [family_info(session, f) for f in session.scalars(select(Family).order_by(Family.name))]


@router.get("/models/{family}", response_model=FamilyInfo, responses={404: {"description": "unknown family"}})
def show_family(family: str = FamilyName, _: Principal = Depends(current_principal),
                storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return family_info(session, get_family(session, family))


@router.get("/models/{family}/versions", response_model=list[VersionInfo],
            responses={404: {"description": "unknown family"}})
def list_versions(family: str = FamilyName, _: Principal = Depends(current_principal),
                  storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        fam = get_family(session, family)
        rows = session.scalars(select(Version).where(Version.family == family).order_by(Version.number))
        return [version_info(v, fam) for v in rows]


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
    return FileResponse(storage.blobs.path(row.weights_sha256), media_type="application/octet-stream",
                        headers={"ETag": etag, "X-Content-SHA256": row.weights_sha256,
                                 "Cache-Control": "private, max-age=31536000, immutable"})
