"""Server settings: one dataclass, passed to API processes and the merge worker as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .merging import MergeSettings

SETTINGS_ENV = "DAFNE_SERVER_SETTINGS"  # JSON; how `server run` hands settings to uvicorn workers


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

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).resolve() / 'server.db'}"

    @property
    def blob_dir(self) -> Path:
        return Path(self.data_dir) / "blobs"

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
