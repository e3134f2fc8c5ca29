"""Merge-worker heartbeats: how the API's ``/healthz`` and the supervisor tell a live worker from
a missing or stuck one.

Each worker process writes ``<data_dir>/workers/<holder>.json`` every ``worker_heartbeat_s`` from a
thread of its own: ``beat`` (the process is alive), ``state`` and ``progress`` (when its main loop
last finished a step: an idle poll, a merge, the start-up scoring). A worker is *missing* when no
file has a beat younger than ``worker_missing_after_s``, *stuck* when a live one has made no progress
for ``worker_stuck_after_s``. Files live in the data folder because every merge worker shares it
(it holds the blobs), whichever host it runs on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .config import ServerSettings
from .private_files import FILE_MODE, private_dir


def heartbeat_dir(settings: ServerSettings) -> Path:
    return Path(settings.data_dir) / "workers"


class Heartbeat:
    """Writes this worker's heartbeat file from a daemon thread until :meth:`close`."""

    def __init__(self, settings: ServerSettings, holder: str) -> None:
        self.settings = settings
        self.path = private_dir(heartbeat_dir(settings)) / f"{holder.replace(':', '_')}.json"
        self.record: dict[str, Any] = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                       "state": "starting", "progress": time.time()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        prune_heartbeats(self.settings)
        self._write()
        self._thread.start()
        return self

    def progress(self, state: str) -> None:
        """The main loop finished a step and is now doing ``state`` (e.g. ``idle``, ``merging leg``)."""
        self.record = {**self.record, "state": state, "progress": time.time()}

    def _write(self) -> None:
        # Not fsynced: a heartbeat lost in a power cut is simply late.
        tmp = self.path.with_name(f".{self.path.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps({**self.record, "beat": time.time()}).encode("utf-8"))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            with contextlib.suppress(OSError):  # a full disk must not kill the worker; /healthz will tell
                self._write()

    def close(self) -> None:
        """Stop beating and remove the file (a clean exit is not a missing worker's)."""
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def read_heartbeats(settings: ServerSettings) -> list[dict[str, Any]]:
    """Every worker's last record (unreadable or half-written files skipped)."""
    records = []
    folder = heartbeat_dir(settings)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and isinstance(record.get("beat"), float | int):
                records.append(record)
    return records


def prune_heartbeats(settings: ServerSettings, older_than_s: float = 3600.0) -> None:
    """Remove the files of workers that died without a clean exit (killed) over an hour ago."""
    folder = heartbeat_dir(settings)
    for path in folder.glob("*.json") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > older_than_s:
                path.unlink()


def stuck_for(record: dict[str, Any], settings: ServerSettings, at: float) -> float | None:
    """Seconds without progress if the worker of ``record`` is stuck, else None."""
    idle = at - float(record.get("progress", at))
    return idle if idle > settings.worker_stuck_after_s else None


def merge_worker_health(settings: ServerSettings, api_started: float, at: float | None = None) -> dict[str, Any]:
    """``{"state": "ok" | "starting" | "missing" | "stuck", "detail": …, "workers": n}`` for ``/healthz``.

    ``starting``: no live worker yet, but this API process started less than four missing-periods ago
    (a worker imports torch and scores its validation cases before it first reports).
    """
    at = time.time() if at is None else at
    live = [r for r in read_heartbeats(settings) if at - float(r["beat"]) <= settings.worker_missing_after_s]
    if not live:
        if at - api_started < 4 * settings.worker_missing_after_s:
            return {"state": "starting", "workers": 0, "detail": "waiting for the merge worker's first heartbeat"}
        return {"state": "missing", "workers": 0,
                "detail": f"no merge worker has reported in the last {settings.worker_missing_after_s:g} s"}
    for record in live:
        idle = stuck_for(record, settings, at)
        if idle is not None:
            return {"state": "stuck", "workers": len(live),
                    "detail": f"merge worker pid {record.get('pid')} on {record.get('host')} has been "
                              f"{record.get('state')!r} for {idle:.0f} s"}
    return {"state": "ok", "workers": len(live), "detail": ", ".join(sorted({str(r.get("state")) for r in live}))}
