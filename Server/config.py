"""Server settings: one dataclass, passed to API processes and the merge worker as JSON.

The settings every merge worker of a server must agree on (:data:`SHARED_FIELDS`: the validation
cases, whose scores are cached with the versions, the lease TTL and the delta size limit) are
stored in the data folder (:data:`SHARED_FILE`) by ``init`` and ``run``; a standalone
``dafne-server worker`` reads them from there, so it judges candidates as its server would.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from dafne_logic.core.errors import InputError

from .merging import MergeSettings
from .private_files import write_durable

SETTINGS_ENV = "DAFNE_SERVER_SETTINGS"  # JSON; how `server run` hands settings to uvicorn workers
SHARED_FILE = "settings.json"  # in the data folder
SHARED_FIELDS = ("validation", "validation_cases", "validation_shape", "lease_ttl_s", "max_delta_bytes")


def refuse_database_left_elsewhere(settings: ServerSettings) -> None:
    """Versions before 2026-11-29 built the SQLite URL from the path unescaped, so a data folder named
    with '%XX' or '?' kept its database elsewhere (``x%41`` → ``xA``). Opening a new empty one would
    lose every user and version: the move is asked for instead. Called wherever the database is
    opened (start, gc, user commands), before anything creates the new file.

    Raises:
        InputError: the earlier database exists and the new place holds none.
    """
    from sqlalchemy.engine import make_url

    if settings.database_url:
        return
    earlier = make_url(f"sqlite:///{settings.sqlite_path}").database
    if earlier and Path(earlier) != settings.sqlite_path and Path(earlier).is_file() and not settings.sqlite_path.exists():
        raise InputError(f"this data folder's database was kept at {earlier} by an earlier version (the folder's "
                         f"name holds '%' or '?'); move it (with any -wal and -shm files beside it) to "
                         f"{settings.sqlite_path}, then start again")


@dataclass(frozen=True)
class ServerSettings:
    """Everything an API process or merge worker needs to know."""

    data_dir: str
    database_url: str = ""  # empty: SQLite file in data_dir
    max_upload_bytes: int = 32 << 20  # whole request body (multipart) limit
    max_delta_bytes: int = 64 << 20  # decompressed delta limit
    max_relative_norm: float = 0.5  # ‖Δ‖ / ‖active weights‖ above this is refused at upload
    uploads_per_hour: int = 30  # accepted uploads per user
    refused_uploads_per_hour: int = 60  # per user; beyond this, uploads are not even checked (429)
    max_concurrent_uploads: int = 8  # uploads checked at once per API process (each holds ~3× the model's fp16 size)
    max_concurrent_uploads_per_user: int = 2
    lease_ttl_s: float = 60.0  # a merge lease not renewed for this long may be taken over
    poll_interval_s: float = 1.0  # merge worker: how often it looks for work
    validation: str = "phantom"  # "phantom", "none" (publish without scoring), or a folder of cases
    validation_cases: int = 2  # phantoms per family when validation == "phantom"
    validation_shape: tuple[int, int, int] = (12, 96, 128)  # phantom (z, y, x) voxels
    merge: dict[str, Any] = field(default_factory=dict)  # default MergeSettings overrides for new families
    merge_hold_s: float = 0.0  # fault-injection tests only: hold the lease this long before publishing
    worker_heartbeat_s: float = 2.0  # how often a merge worker reports (see heartbeat.py)
    worker_missing_after_s: float = 15.0  # no report for this long: the worker is missing
    worker_stuck_after_s: float = 1800.0  # no progress (a merge, the start-up scoring) for this long: stuck
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this
    body_timeout_s: float = 30.0  # ... and its body within this, plus 1 s per body_min_rate bytes
    body_min_rate: int = 50_000  # bytes/s a slow but honest uploader is granted on top
    max_connections: int = 200  # per API process; beyond this uvicorn answers 503
    public_dashboard: bool = False  # True: the dashboard at / needs no login

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file in the data folder (used when no ``database_url`` is given)."""
        return Path(self.data_dir).resolve() / "server.db"

    @property
    def url(self) -> str:
        # Rendered by SQLAlchemy: a folder named with "%41" or "?" must not become another file (URL decoding).
        return self.database_url or URL.create("sqlite", database=str(self.sqlite_path)).render_as_string(
            hide_password=False)

    @property
    def blob_dir(self) -> Path:
        return Path(self.data_dir) / "blobs"

    @property
    def validation_id(self) -> str:
        """Names the validation cases: scores cached with a version are reused only for the same cases."""
        if self.validation in ("none", "phantom"):
            shape = "x".join(map(str, self.validation_shape))
            return "none" if self.validation == "none" else f"phantom:{self.validation_cases}:{shape}"
        # Taken once per settings object: a merge worker builds its cases once per process, so scores it
        # records must carry the fingerprint of the files it read, not of files edited since.
        fingerprint = self.__dict__.get("_validation_fingerprint")
        if fingerprint is None:
            fingerprint = _folder_fingerprint(Path(self.validation))
            object.__setattr__(self, "_validation_fingerprint", fingerprint)  # a cache, not a setting (frozen)
        return f"folder:{Path(self.validation).resolve()}:{fingerprint}"

    def default_merge_settings(self) -> MergeSettings:
        return MergeSettings.from_json(self.merge)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        data = json.loads(text)
        data["validation_shape"] = tuple(data.get("validation_shape", cls.validation_shape))
        return cls(**data)

    @classmethod
    def from_env(cls) -> ServerSettings:
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with `dafne-server run`")
        return cls.from_json(text)


def shared_settings_path(settings: ServerSettings) -> Path:
    return Path(settings.data_dir) / SHARED_FILE


def load_shared(settings: ServerSettings) -> ServerSettings:
    """``settings`` with the :data:`SHARED_FIELDS` stored in its data folder (unchanged if none are)."""
    path = shared_settings_path(settings)
    if not path.is_file():
        return settings
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        values = {k: stored[k] for k in SHARED_FIELDS if k in stored}
        if "validation_shape" in values:
            values["validation_shape"] = tuple(values["validation_shape"])
        return replace(settings, **values)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path} does not hold the server's settings ({exc}); run `dafne-server init` again") from exc


def store_shared(settings: ServerSettings) -> None:
    """Write the :data:`SHARED_FIELDS` of ``settings`` to its data folder (atomic, durable, owner-only).

    A validation folder is stored as an absolute path, so workers started elsewhere find it.
    """
    values = {k: getattr(settings, k) for k in SHARED_FIELDS}
    if values["validation"] not in ("phantom", "none"):
        values["validation"] = str(Path(values["validation"]).resolve())
    write_durable(shared_settings_path(settings), json.dumps(values, indent=1).encode("utf-8"))


def _folder_fingerprint(folder: Path) -> str:
    """A short digest of the files under ``folder`` (names, sizes, modification times): edited or
    added validation cases are other cases, whose scores must not be compared with the cached ones."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

