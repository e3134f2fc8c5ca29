"""Delta uploads (checked by :mod:`dafne_server.uploads` before anything is stored) and their status."""

from __future__ import annotations

import logging
from typing import cast

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Request, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from .. import crud, uploads
from ..auth import Principal
from ..db import UpdateRow
from ..deps import FamilyName, current_principal, get_storage
from ..schemas import Accepted, MeInfo, UpdateInfo, UpdateStatus
from ..storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["updates"])


def _info(row: UpdateRow) -> UpdateInfo:
    return UpdateInfo(id=row.id, family=row.family, status=cast(UpdateStatus, row.status), reason=row.reason,
                      parent_version=row.parent_version, merged_into=row.merged_into, n_slices=row.n_slices,
                      created_at=row.created_at)


@router.post("/models/{family}/updates", status_code=202, response_model=Accepted,
             responses={200: {"model": Accepted, "description": "the same upload was seen before (same idempotency key)"},
                        401: {}, 404: {}, 409: {"description": "parent version too stale or not in the active "
                                                              "version's history, or an idempotency key reused"},
                        413: {}, 422: {}, 429: {"description": "upload rate or concurrency limit"},
                        503: {"description": "storage or database unavailable; retry after the Retry-After seconds"}})
def upload_update(request: Request, family: str = FamilyName,
                  delta: UploadFile = File(..., description="zlib-compressed fp16 safetensors delta"),
                  metadata: str = Form(..., max_length=65536, description="JSON: dafne_logic.learning.delta.DeltaMetadata"),
                  who: Principal = Depends(current_principal), storage: Storage = Depends(get_storage)):
    """Check an update completely, then store it as *buffered* (202), or refuse it with a reason.

    Every refusal is audited; so are the server's own failures, apart (they do not count as refusals).
    """
    try:
        try:
            uploads.check_refusal_budget(storage, who)
            with request.app.state.upload_slots.slot(who.name):
                receipt = uploads.receive_update(storage, family, metadata, delta.file, who)
        except uploads.UploadRefused as exc:
            # Audited first; a locked or full database while auditing is the server's failure (503 below), not a 500.
            uploads.record_refusal(storage, who, family, exc.status, exc.reason, exc.throttled)
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            raise HTTPException(exc.status, exc.reason, headers=headers) from None
        except crud.NotFound as exc:
            uploads.record_refusal(storage, who, family, 404, str(exc), throttled=False)
            raise
    except (OSError, OperationalError) as exc:  # storage or database unavailable: the client may retry later
        uploads.record_failure(storage, who, family, 503, exc)
        log.exception("upload by %s to %s failed", who.name, family)
        raise HTTPException(503, "the server could not store the upload just now; retry later",
                            headers={"Retry-After": "30"}) from None
    except (HTTPException, crud.NotFound):
        raise
    except Exception as exc:
        uploads.record_failure(storage, who, family, 500, exc)
        raise
    body = Accepted(id=receipt.id, status=receipt.status, duplicate=receipt.duplicate).model_dump()
    return JSONResponse(body, 200 if receipt.duplicate else 202)


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
        n = crud.count_updates(session, who.user_id)
    return MeInfo(name=who.name, scope=who.scope, token_id=who.token_id, updates=n)
