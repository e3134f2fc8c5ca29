"""Process layout of ``dafne-server run``: uvicorn API workers plus one supervised merge-worker process.

The merge worker is a separate process (``python -m dafne_server.worker``) so merging never
competes with request handlers for the interpreter. A supervisor thread restarts it when it dies
or stops making progress; it exits when this process goes away, however that happens (its
lifeline pipe closes). More merge workers (on other hosts, against the same PostgreSQL) are safe:
the lease row decides.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dafne_logic.core.errors import DafneError

from .config import SETTINGS_ENV, SHARED_FILE, ServerSettings, refuse_database_left_elsewhere
from .deadlines import PROTOCOL as DEADLINE_PROTOCOL
from .heartbeat import read_heartbeats, stuck_for
from .private_files import make_private_file, private_dir, tighten_tree
from .sessions import KEY_FILE, ensure_session_key
from .storage import Storage
from .worker import LIFELINE_GRACE_S

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


# What the server keeps in its data folder (and the test harness's log): a folder holding other
# things and none of these is not a data folder, and making everything in it owner-only would hurt.
SERVER_ENTRIES = frozenset({"server.db", "server.db-wal", "server.db-shm", "blobs", "workers", KEY_FILE, SHARED_FILE,
                            "server.log"})


def check_data_folder(data_dir: str | os.PathLike[str]) -> None:
    """Refuse a folder that already holds files but no server data (``--data-dir ~``, say)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        return
    # What file systems and file managers put in any folder is not "other files".
    entries = {entry.name for entry in folder.iterdir()
               if not entry.name.startswith(".") and entry.name not in ("lost+found", "Thumbs.db", "desktop.ini")}
    if entries and not entries & SERVER_ENTRIES:
        raise DafneError(f"--data-dir {data_dir} already holds other files ({', '.join(sorted(entries)[:3])}…) and "
                         "no server data; give the server a folder of its own (it makes everything in it owner-only).")


def secure_data_folder(settings: ServerSettings) -> None:
    """Create the data folder owner-only, and the SQLite database before SQLite does (its -wal and
    -shm files take the database file's mode); tighten what older versions left readable."""
    check_data_folder(settings.data_dir)
    private_dir(settings.data_dir)
    if not settings.database_url:
        refuse_database_left_elsewhere(settings)
        make_private_file(settings.sqlite_path)
    tighten_tree(settings.data_dir)


def prepare(settings: ServerSettings) -> Storage:
    """Create the data folder (owner-only) and bring the schema up to date."""
    secure_data_folder(settings)
    ensure_session_key(settings)
    storage = Storage(settings)
    storage.migrate()
    storage.blobs.sweep_temporaries()
    storage.collect_blobs()
    return storage


def start_merge_worker(settings: ServerSettings) -> subprocess.Popen:
    """The merge worker as a child process holding a lifeline: its standard input is a pipe whose
    other end only this process holds, so it ends when this process does, however that happens."""
    env = {**os.environ, SETTINGS_ENV: settings.to_json()}
    return subprocess.Popen([sys.executable, "-m", "dafne_server.worker", "--lifeline"], env=env,
                            stdin=subprocess.PIPE)


def stop_merge_worker(process: subprocess.Popen, grace_s: float = LIFELINE_GRACE_S + 5.0) -> None:
    """Close the lifeline (the worker finishes its step or is cut short); kill it if it lingers."""
    with contextlib.suppress(OSError):
        process.stdin.close()  # type: ignore[union-attr]
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()  # it ignores SIGTERM (see worker.main)
        process.wait()


class MergeWorkerSupervisor:
    """Keeps one merge worker running beside the API: restarts it when it exits and replaces it
    when its heartbeat shows no progress for ``worker_stuck_after_s`` (see :mod:`.heartbeat`).

    Restarts back off from 1 s to 60 s while the worker keeps dying young (a broken setup must not
    spin); a worker that lived a minute resets the backoff.
    """

    def __init__(self, settings: ServerSettings, check_every_s: float = 1.0) -> None:
        self.settings = settings
        self.check_every_s = check_every_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merge-worker-supervisor", daemon=True)

    def start(self) -> MergeWorkerSupervisor:
        self.process = start_merge_worker(self.settings)
        self._thread.start()
        return self

    def _stuck(self) -> float | None:
        at = time.time()
        host = socket.gethostname()  # containers on several hosts sharing the data folder reuse pids
        for record in read_heartbeats(self.settings):
            if self.process is not None and record.get("pid") == self.process.pid and record.get("host") == host:
                return stuck_for(record, self.settings, at)
        return None

    def _run(self) -> None:
        backoff, started = 1.0, time.monotonic()
        while not self._stop.wait(self.check_every_s):
            assert self.process is not None
            code = self.process.poll()
            stuck = None if code is not None else self._stuck()
            if code is None and stuck is None:
                continue
            if code is None:
                log.error("merge worker pid %s made no progress for %.0f s: replacing it", self.process.pid, stuck)
                stop_merge_worker(self.process, grace_s=2.0)
            else:
                log.error("merge worker pid %s exited with %s: restarting it", self.process.pid, code)
            backoff = 1.0 if time.monotonic() - started > 60 else min(2 * backoff, 60.0)
            if self._stop.wait(backoff):
                return
            self.process, started = start_merge_worker(self.settings), time.monotonic()
            self.restarts += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.process is not None:
            stop_merge_worker(self.process)


def serve(settings: ServerSettings, host: str, port: int, workers: int = 1, merge_worker: bool = True,
          log_level: str = "info", ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the API (blocking) with a supervised merge worker beside it; both stop together.

    Every request must arrive within the settings' header and body deadlines (:mod:`.deadlines`);
    beyond ``max_connections`` open connections per API process, uvicorn answers 503.

    With ``ssl_certfile``/``ssl_keyfile`` uvicorn serves HTTPS itself; otherwise put a TLS reverse
    proxy in front of anything but loopback.
    """
    import uvicorn

    prepare(settings).dispose()
    os.environ[SETTINGS_ENV] = settings.to_json()
    supervisor = MergeWorkerSupervisor(settings).start() if merge_worker else None
    try:
        uvicorn.run("dafne_server.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, log_config=log_config(), timeout_graceful_shutdown=5,
                    http=DEADLINE_PROTOCOL, limit_concurrency=settings.max_connections,
                    ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    finally:
        if supervisor is not None:
            supervisor.stop()
