"""Dashboard sessions: a signed, expiring cookie naming the token its holder logged in with.

The cookie holds the token's id only (never the token), signed with a key kept owner-only in the
data folder (:data:`KEY_FILE`, made by ``prepare``, shared by every API process); each request checks
the signature, the age and that the token is still live, so revoking a token ends its sessions.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from .config import ServerSettings
from .db import Token, now
from .private_files import write_durable

KEY_FILE = "session.key"
COOKIE = "dafne_session"
MAX_AGE_S = 12 * 3600


def ensure_session_key(settings: ServerSettings) -> None:
    """Create the signing key once (before any API process starts, so all share it)."""
    path = Path(settings.data_dir) / KEY_FILE
    if not path.is_file():
        write_durable(path, secrets.token_hex(32).encode("ascii"))


class SessionSigner:
    def __init__(self, settings: ServerSettings) -> None:
        ensure_session_key(settings)
        key = (Path(settings.data_dir) / KEY_FILE).read_text(encoding="ascii").strip()
        self._serializer = URLSafeTimedSerializer(key, salt="dafne-dashboard")

    def cookie_for(self, token_id: int) -> str:
        return self._serializer.dumps({"token": token_id})

    def token_id(self, cookie: str | None) -> int | None:
        """The token id a valid, unexpired cookie names; None for anything else."""
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=MAX_AGE_S)
        except BadSignature:  # also SignatureExpired
            return None
        token_id = data.get("token") if isinstance(data, dict) else None
        return token_id if isinstance(token_id, int) else None

    def is_live(self, session: Session, cookie: str | None) -> bool:
        """True when ``cookie`` is valid and names a token that is neither revoked nor expired."""
        token_id = self.token_id(cookie)
        row = session.get(Token, token_id) if token_id is not None else None
        return row is not None and row.revoked_at is None and (row.expires_at is None or row.expires_at > now())
