"""FastAPI dependencies: storage, the caller's identity, admin scope, and the path parameters routers share."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Path, Request

from .auth import Principal, authenticate
from .storage import Storage

FamilyName = Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length=64)
VersionRef = Path(pattern=r"^(active|[0-9]{1,9})$", description="a version number or `active`")


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


UNAUTHENTICATED = "missing, unknown, expired or revoked bearer token"


def current_principal(request: Request, storage: Storage = Depends(get_storage)) -> Principal:
    """The caller, from ``Authorization: Bearer …`` only (never a query parameter or cookie)."""
    with storage.read() as session:
        principal = authenticate(session, request.headers.get("authorization"))
    if principal is None:
        raise HTTPException(401, UNAUTHENTICATED, headers={"WWW-Authenticate": "Bearer"})
    return principal


def admin_principal(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin-scoped token")
    return principal
