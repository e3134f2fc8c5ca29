"""Delta uploads (validated before anything is stored) and their status."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, UploadFile
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from dafne_logic.core.errors import ModelError
from dafne_logic.inference.model_package import Manifest
from dafne_logic.learning.delta import decode_delta, delta_norm

from ..auth import Principal
from ..db import AuditEntry, UpdateRow, audit, now
from ..deps import current_principal, get_storage
from ..merging import MergeSettings
from ..schemas import Accepted, MeInfo, UpdateInfo, UpdateMetadata
from ..storage import Storage, known_weights
from .models import FamilyName, get_family, get_version

router = APIRouter(prefix="/v1", tags=["updates"])

# Leading bytes of things that are not our upload format, for a clearer refusal.
_FOREIGN_FORMATS = {
    b"\x80": "a Python pickle",
    b"PK\x03\x04": "a zip archive (e.g. a torch checkpoint)",
    b"\x89HDF": "an HDF5 file (e.g. a Keras model)",
}


def _sniff(blob: bytes) -> None:
    for magic, what in _FOREIGN_FORMATS.items():
        if blob.startswith(magic):
            raise HTTPException(422, f"the delta is {what}; only zlib-compressed safetensors deltas are accepted")


def _info(row: UpdateRow) -> UpdateInfo:
    return UpdateInfo(id=row.id, family=row.family, status=row.status, reason=row.reason,
                      parent_version=row.parent_version, merged_into=row.merged_into, n_slices=row.n_slices,
                      created_at=row.created_at)


@router.post("/models/{family}/updates", status_code=202, response_model=Accepted,
             responses={200: {"model": Accepted, "description": "the same idempotency key was seen before"},
                        401: {}, 404: {}, 409: {"description": "parent version too stale"},
                        413: {}, 422: {}, 429: {"description": "upload rate limit"}})
def upload_update(family: str = FamilyName,
                  delta: UploadFile = File(..., description="zlib-compressed fp16 safetensors delta"),
                  metadata: str = Form(..., max_length=65536, description="JSON UpdateMetadata"),
                  who: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    """Check an update completely, then store it as *buffered* (202), or refuse it with a reason.

    Refusals are audited, and a user refused too often in the last hour is not checked again
    until the hour has passed (429): checking costs the server CPU.
    """
    limit = storage.settings.refused_uploads_per_hour
    with storage.read() as session:
        refused = session.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.actor == who.name, AuditEntry.action == "update_refused", AuditEntry.at > now() - 3600)) or 0
    if refused >= limit:
        raise HTTPException(429, f"more than {limit} refused uploads in the last hour; fix the client and retry later")
    try:
        return _receive(family, delta, metadata, who, storage)
    except HTTPException as exc:
        if exc.status_code != 429:
            with storage.session.begin() as session:
                audit(session, who.name, "update_refused", family, status=exc.status_code, reason=str(exc.detail)[:300])
        raise


def _receive(family: str, delta: UploadFile, metadata: str, who: Principal, storage: Storage):  # noqa: ANN202
    settings = storage.settings
    try:
        meta = UpdateMetadata.model_validate_json(metadata)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise HTTPException(422, f"metadata: {'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
    if meta.family is not None and meta.family != family:
        raise HTTPException(422, f"metadata names family {meta.family!r} but the upload is for {family!r}")
    blob = delta.file.read(settings.max_upload_bytes + 1)
    if len(blob) > settings.max_upload_bytes:
        raise HTTPException(413, f"the delta is larger than {settings.max_upload_bytes} bytes")
    _sniff(blob)
    with storage.read() as session:
        fam = get_family(session, family)
        existing = session.scalar(select(UpdateRow).where(UpdateRow.user_id == who.user_id,
                                                          UpdateRow.idempotency_key == meta.idempotency_key))
        if existing is not None:
            return JSONResponse(Accepted(id=existing.id, status=existing.status, duplicate=True).model_dump(), 200)
        recent = session.scalar(select(func.count()).select_from(UpdateRow).where(
            UpdateRow.user_id == who.user_id, UpdateRow.created_at > now() - 3600)) or 0
        if recent >= settings.uploads_per_hour:
            raise HTTPException(429, f"at most {settings.uploads_per_hour} uploads per hour per user")
        try:
            parent = get_version(session, fam, meta.parent_version)
        except HTTPException:
            raise HTTPException(422, f"parent version {meta.parent_version} of {family} is unknown") from None
        if meta.parent_sha256 is not None and meta.parent_sha256 not in known_weights(parent):
            raise HTTPException(409, f"the delta was made against other weights than version {parent.number} of "
                                     f"{family} on this server; pull version {parent.number} (or the active one) "
                                     "and fine-tune again")
        active = get_version(session, fam, "active")
        max_staleness = MergeSettings.from_json(fam.merge_settings).max_staleness
    staleness = active.number - parent.number
    if staleness > max_staleness:
        raise HTTPException(409, f"parent version {parent.number} is {staleness} versions behind the active "
                           f"{active.number} (at most {max_staleness}); pull the new version and fine-tune again")
    try:
        decoded = decode_delta(blob, Manifest.from_json(parent.manifest), settings.max_delta_bytes)
    except ModelError as exc:
        raise HTTPException(422, str(exc)) from None
    norm = delta_norm(decoded)
    bound = settings.max_relative_norm * storage.weights_norm(active)
    if norm > bound:
        raise HTTPException(422, f"update norm {norm:.3g} exceeds the bound {bound:.3g} "
                           f"({settings.max_relative_norm} × the active weights' norm)")
    sha = storage.blobs.put(blob)
    row = UpdateRow(id=uuid.uuid4().hex, family=family, user_id=who.user_id, idempotency_key=meta.idempotency_key,
                    parent_version=parent.number, n_slices=meta.n_slices, client_dice=meta.dice_per_label,
                    client_version=meta.client_version, blob_sha256=sha, blob_size=len(blob), norm=norm,
                    status="buffered", reason="")
    try:
        with storage.session.begin() as session:
            session.add(row)
            audit(session, who.name, "update_received", family, update=row.id, parent=parent.number,
                  bytes=len(blob), norm=round(norm, 6), n_slices=meta.n_slices)
    except IntegrityError:  # the same idempotency key raced in from a retry
        with storage.read() as session:
            existing = session.scalar(select(UpdateRow).where(UpdateRow.user_id == who.user_id,
                                                              UpdateRow.idempotency_key == meta.idempotency_key))
        if existing is None:
            raise
        return JSONResponse(Accepted(id=existing.id, status=existing.status, duplicate=True).model_dump(), 200)
    return Accepted(id=row.id, status="buffered")


@router.get("/updates/{update_id}", response_model=UpdateInfo, responses={404: {}})
def show_update(update_id: str = Path(pattern=r"^[0-9a-f]{32}$"), who: Principal = Depends(current_principal),
                storage: Storage = Depends(get_storage)):
    """An update's state: buffered, rejected (with the reason) or merged into version N."""
    with storage.read() as session:
        row = session.get(UpdateRow, update_id)
        if row is None or (row.user_id != who.user_id and not who.is_admin):
            raise HTTPException(404, "no such update")
        return _info(row)


@router.get("/me", response_model=MeInfo)
def me(who: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        n = session.scalar(select(func.count()).select_from(UpdateRow).where(UpdateRow.user_id == who.user_id))
    return MeInfo(name=who.name, scope=who.scope, token_id=who.token_id, updates=n or 0)
