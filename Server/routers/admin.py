"""Administration: users and tokens, version activation, forced merges, merge settings, audit log."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from sqlalchemy.exc import IntegrityError

from .. import crud
from ..auth import Principal, create_user, issue_token, revoke_token
from ..crud import family_info, get_family
from ..db import MAX_INTEGER, audit
from ..deps import FamilyName, admin_principal, get_storage
from ..merging import MergeSettings
from ..schemas import (
    ActivateRequest,
    AuditInfo,
    FamilyInfo,
    IssuedToken,
    MergeSettingsBody,
    NewToken,
    NewUser,
    UserInfo,
)
from ..storage import Storage

router = APIRouter(prefix="/v1/admin", tags=["admin"])
UserName = Path(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")


def _days(days: float | None) -> float | None:
    return None if days is None else days * 86400.0


def _issued(token: str, user: str, scope: str) -> IssuedToken:
    return IssuedToken(user=user, token=token, token_id=int(token.split("_")[1]), scope=scope)


@router.get("/users", response_model=list[UserInfo])
def list_users(_: Principal = Depends(admin_principal), storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return [UserInfo(name=user.name, is_admin=user.is_admin, tokens=[
                    {"id": t.id, "scope": t.scope, "created_at": t.created_at, "expires_at": t.expires_at,
                     "revoked": t.revoked_at is not None} for t in tokens])
                for user, tokens in crud.users_with_tokens(session)]


@router.post("/users", response_model=IssuedToken, status_code=201, responses={409: {}})
def add_user(body: NewUser, who: Principal = Depends(admin_principal), storage: Storage = Depends(get_storage)):
    """Create a user; the response holds their token, shown this once."""
    try:
        with storage.session.begin() as session:
            token = create_user(session, body.name, body.admin, who.name, _days(body.expires_in_days))
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    except IntegrityError:  # created by a concurrent request after our check (PostgreSQL's read committed)
        raise HTTPException(409, f"user {body.name!r} already exists") from None
    return _issued(token, body.name, "admin" if body.admin else "contributor")


@router.post("/users/{name}/tokens", response_model=IssuedToken, status_code=201, responses={404: {}, 409: {}})
def add_token(body: NewToken, name: str = UserName, who: Principal = Depends(admin_principal),
              storage: Storage = Depends(get_storage)):
    with storage.session.begin() as session:
        try:
            token = issue_token(session, crud.get_user(session, name), body.scope, _days(body.expires_in_days), who.name)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
    return _issued(token, name, body.scope)


@router.delete("/tokens/{token_id}", status_code=204, responses={404: {}})
def revoke(token_id: int = Path(ge=1, le=MAX_INTEGER), who: Principal = Depends(admin_principal),
           storage: Storage = Depends(get_storage)):
    with storage.session.begin() as session:
        if not revoke_token(session, token_id, who.name):
            raise HTTPException(404, f"no live token {token_id}")
    return Response(status_code=204)


@router.post("/models/{family}/activate", response_model=FamilyInfo, responses={404: {}})
def activate(body: ActivateRequest, family: str = FamilyName, who: Principal = Depends(admin_principal),
             storage: Storage = Depends(get_storage)):
    """Make an existing version active (rollback or roll forward)."""
    with storage.session.begin() as session:
        fam = get_family(session, family, for_update=True)  # after a merge's publish, and audits what it replaced
        try:
            storage.activate(session, fam, body.version, who.name)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        return family_info(session, fam)


@router.post("/models/{family}/merge", status_code=202, responses={404: {}})
def force_merge(family: str = FamilyName, who: Principal = Depends(admin_principal),
                storage: Storage = Depends(get_storage)) -> dict:
    """Ask the merge worker to merge whatever is buffered, even fewer than K updates."""
    with storage.session.begin() as session:
        crud.request_merge(session, family)
        audit(session, who.name, "merge_requested", family)
    return {"family": family, "requested": True}


@router.get("/models/{family}/settings", response_model=MergeSettingsBody, responses={404: {}})
def get_settings(family: str = FamilyName, _: Principal = Depends(admin_principal),
                 storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return MergeSettingsBody(**MergeSettings.from_json(get_family(session, family).merge_settings).to_json())


@router.patch("/models/{family}/settings", response_model=MergeSettingsBody, responses={404: {}, 422: {}})
def set_settings(body: MergeSettingsBody, family: str = FamilyName, who: Principal = Depends(admin_principal),
                 storage: Storage = Depends(get_storage)):
    with storage.session.begin() as session:
        fam = get_family(session, family, for_update=True)  # two admins' changes both land, not the last one only
        changes = body.model_dump(exclude_unset=True)
        nulls = sorted(k for k, v in changes.items() if v is None and k != "clip_norm")  # clip_norm null: median norm
        if nulls:
            raise HTTPException(422, f"{', '.join(nulls)} must be a value, not null (omit a field to keep it)")
        try:
            merged = MergeSettings.from_json({**fam.merge_settings, **changes})
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        fam.merge_settings = merged.to_json()
        audit(session, who.name, "settings_changed", family, changes=changes)
        return MergeSettingsBody(**merged.to_json())


@router.get("/audit", response_model=list[AuditInfo])
def audit_log(after_id: int = Query(0, ge=0, le=MAX_INTEGER), limit: int = Query(100, ge=1, le=1000),
              _: Principal = Depends(admin_principal), storage: Storage = Depends(get_storage)):
    with storage.read() as session:
        return [AuditInfo(id=r.id, at=r.at, actor=r.actor, action=r.action, family=r.family, detail=r.detail)
                for r in crud.audit_entries(session, after_id, limit)]
