"""Process layout of ``dafne-server run``: uvicorn API workers plus one merge-worker process.

The merge worker is a separate process (``python -m dafne_server.worker``) so merging never
competes with request handlers for the interpreter; it exits when this process goes away. More
merge workers (on other hosts, against the same PostgreSQL) are safe: the lease row decides.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import sys

from .config import SETTINGS_ENV, ServerSettings
from .storage import Storage

log = logging.getLogger(__name__)

def _char(chars: str) -> str:
    """A character of ``chars``, or any percent-encoded byte (a client may encode a URL's token)."""
    return f"(?:[{chars}]|%[0-9A-Fa-f]{{2}})"


_TOKEN_TEXT = re.compile(f"(?:d|%64)(?:f|%66)(?:t|%74){_char('_')}{_char('0-9')}+{_char('_')}{_char('A-Za-z0-9_-')}+")


class RedactTokens(logging.Filter):
    """Tokens only travel in the Authorization header, which is never logged; a client that puts
    one in a URL anyway must not get it into the access log either."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(_TOKEN_TEXT.sub("dft_<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _TOKEN_TEXT.sub("dft_<redacted>", record.msg)
        return True


def log_config() -> dict:
    """uvicorn's logging configuration with :class:`RedactTokens` on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": "dafne_server.runner.RedactTokens"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config


def prepare(settings: ServerSettings) -> Storage:
    """Create the data folder and bring the schema up to date."""
    storage = Storage(settings)
    storage.migrate()
    storage.blobs.sweep_temporaries()
    storage.collect_blobs()
    return storage


def start_merge_worker(settings: ServerSettings) -> subprocess.Popen:
    env = {**os.environ, SETTINGS_ENV: settings.to_json()}
    return subprocess.Popen([sys.executable, "-m", "dafne_server.worker"], env=env)


def serve(settings: ServerSettings, host: str, port: int, workers: int = 1, merge_worker: bool = True,
          log_level: str = "info", ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the API (blocking) with a merge worker beside it; both stop together.

    With ``ssl_certfile``/``ssl_keyfile`` uvicorn serves HTTPS itself; otherwise put a TLS reverse
    proxy in front of anything but loopback.
    """
    import uvicorn

    prepare(settings).dispose()
    os.environ[SETTINGS_ENV] = settings.to_json()
    worker = start_merge_worker(settings) if merge_worker else None
    try:
        uvicorn.run("dafne_server.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, log_config=log_config(), timeout_graceful_shutdown=5,
                    ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
