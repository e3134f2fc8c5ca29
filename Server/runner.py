"""Process layout of ``dafne-slicer server run``: uvicorn API workers plus one merge-worker process.

The merge worker is a separate process (``python -m dafne_server.worker``) so merging never
competes with request handlers for the interpreter; it exits when this process goes away. More
merge workers (on other hosts, against the same PostgreSQL) are safe: the lease row decides.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from .config import SETTINGS_ENV, ServerSettings
from .storage import Storage

log = logging.getLogger(__name__)


def prepare(settings: ServerSettings) -> Storage:
    """Create the data folder and bring the schema up to date."""
    storage = Storage(settings)
    storage.migrate()
    storage.blobs.sweep_temporaries()
    return storage


def start_merge_worker(settings: ServerSettings) -> subprocess.Popen:
    env = {**os.environ, SETTINGS_ENV: settings.to_json()}
    return subprocess.Popen([sys.executable, "-m", "dafne_server.worker"], env=env)


def serve(settings: ServerSettings, host: str, port: int, workers: int = 1, merge_worker: bool = True,
          log_level: str = "info") -> None:
    """Run the API (blocking) with a merge worker beside it; both stop together."""
    import uvicorn

    prepare(settings).dispose()
    os.environ[SETTINGS_ENV] = settings.to_json()
    worker = start_merge_worker(settings) if merge_worker else None
    try:
        uvicorn.run("dafne_server.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
