"""Bearer tokens: ``dft_<token id>_<secret>``, only sha256(secret) stored, compared in constant time.

The secret has 256 bits of entropy, so an unsalted sha256 is enough (no password stretching
needed); the token id lets the server fetch one row and compare with :func:`hmac.compare_digest`.
Tokens never appear in logs: only the token id is ever recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import MAX_INTEGER, Token, User, audit, now

SCOPES = ("contributor", "admin")
_TOKEN = re.compile(r"^dft_([0-9]{1,12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and the scope of the token used."""

    user_id: int
    name: str
    scope: str
    token_id: int

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def issue_token(session: Session, user: User, scope: str, expires_in_s: float | None = None,
                actor: str = "cli") -> str:
    """Create a token for ``user`` and return it; it is not retrievable afterwards."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if scope == "admin" and not user.is_admin:
        raise ValueError(f"user {user.name} is not an administrator")
    secret = secrets.token_urlsafe(32)
    row = Token(user_id=user.id, secret_sha256=_digest(secret), scope=scope,
                expires_at=None if expires_in_s is None else now() + expires_in_s)
    session.add(row)
    session.flush()
    audit(session, actor, "token_issued", user=user.name, token_id=row.id, scope=scope)
    return f"dft_{row.id}_{secret}"


def create_user(session: Session, name: str, admin: bool = False, actor: str = "cli",
                expires_in_s: float | None = None) -> str:
    """Add a user and return their first token (admin scope for administrators)."""
    if not re.match(r"^[A-Za-z0-9_.@-]{1,64}$", name):
        raise ValueError("user names are 1-64 letters, digits or _.@-")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise ValueError(f"user {name!r} already exists")
    user = User(name=name, is_admin=admin)
    session.add(user)
    session.flush()
    audit(session, actor, "user_created", user=name, admin=admin)
    return issue_token(session, user, "admin" if admin else "contributor", expires_in_s, actor)


def authenticate(session: Session, header: str | None) -> Principal | None:
    """``Authorization`` header value → principal, or None for anything not a live token."""
    if not header or not header.startswith("Bearer "):
        return None
    match = _TOKEN.match(header[len("Bearer "):].strip())
    if match is None or int(match.group(1)) > MAX_INTEGER:  # no such row; PostgreSQL would refuse the number
        return None
    row = session.get(Token, int(match.group(1)))
    expected = row.secret_sha256 if row is not None else "0" * 64
    valid = hmac.compare_digest(_digest(match.group(2)), expected)
    if row is None or not valid or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now():
        return None
    user = session.get(User, row.user_id)
    if user is None:  # the token's user row is gone: the token is as good as revoked
        return None
    return Principal(user.id, user.name, row.scope, row.id)


def revoke_token(session: Session, token_id: int, actor: str) -> bool:
    row = session.get(Token, token_id) if 0 < token_id <= MAX_INTEGER else None
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now()
    audit(session, actor, "token_revoked", token_id=token_id)
    return True
