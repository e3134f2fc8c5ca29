"""Long work (inference, fine-tuning, sync) as jobs the GUI thread polls.

:class:`ProcessJob` (what the module uses) runs a :mod:`.worker` request in a separate Python
process: it does not compete with Slicer's GUI thread for Python's GIL, a crash cannot take
Slicer down, and terminating it is a clean cancel. :class:`BackgroundJob` runs a function on a
thread of this process (tests and plain-Python scripts). Both are polled: the widget calls
``poll()`` from a ``qt.QTimer`` and, once done, converts the result to MRML on the GUI thread,
so the scene changes only on the GUI thread and only with a complete result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dafne_logic.core.errors import Cancelled, DafneError
from dafne_logic.core.progress import CancelCheck, ProgressCallback

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds DafneSlicerLib/ (and dafne_logic/ when installed)

JobFunction = Callable[[ProgressCallback, CancelCheck], Any]


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job for the GUI thread."""

    fraction: float  # 0..1
    message: str
    done: bool
    result: Any = None
    error: str | None = None  # one readable sentence (DafneError) or the exception's first line
    cancelled: bool = False
    details: str | None = None  # traceback of an unexpected exception, for the log


class BackgroundJob:
    """Runs ``function(progress, cancel)`` on a daemon thread; poll it, cancel it, read its result."""

    def __init__(self, name: str, function: JobFunction):
        self.name = name
        self._function = function
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._status = JobStatus(0.0, f"{name}: starting", done=False)
        self._thread = threading.Thread(target=self._run, name=f"dafne-{name}", daemon=True)

    def start(self) -> BackgroundJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next cancel check (it then ends as cancelled, writing nothing)."""
        self._cancel.set()

    def poll(self) -> JobStatus:
        with self._lock:
            return self._status

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job ends (scripts and tests; the GUI polls instead)."""
        self._thread.join(timeout)
        return self.poll()

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            if not self._status.done:
                self._status = JobStatus(min(max(float(fraction), 0.0), 1.0), message, done=False)

    def _run(self) -> None:
        try:
            # A cancel that comes after the function returned is too late: its outputs (e.g. a saved
            # model) exist, so the result is reported, not hidden behind "nothing was changed".
            result = self._function(self._progress, self._cancel.is_set)
            final = JobStatus(1.0, _done_message(self.name, self._cancel.is_set()), done=True, result=result)
        except Cancelled as exc:
            final = JobStatus(self.poll().fraction, str(exc), done=True, cancelled=True)
        except DafneError as exc:
            final = JobStatus(self.poll().fraction, str(exc), done=True, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure must end the job and reach the GUI
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            final = JobStatus(self.poll().fraction, first_line, done=True,
                              error=f"{self.name} failed: {first_line}", details=traceback.format_exc())
        with self._lock:
            self._status = final


def _done_message(name: str, cancel_requested: bool) -> str:
    return f"{name}: done (it had finished when Cancel was pressed)" if cancel_requested else f"{name}: done"


def worker_python() -> str:
    """Slicer's own Python launcher (right environment variables) when inside Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class ProcessJob:
    """Runs ``python -m DafneSlicerLib.worker request.json`` and follows its progress lines without blocking."""

    def __init__(self, name: str, request: dict[str, Any], python: str | None = None):
        from .worker import MARK

        self.name = name
        self._mark = MARK
        self._work_dir = Path(request["work_dir"])
        self._request = request
        self._python = python or worker_python()
        self._status = JobStatus(0.0, f"{name}: starting", done=False)
        self._buffer = b""
        self._final: dict[str, Any] | None = None
        self._cancelled = False
        self._process: subprocess.Popen | None = None

    def start(self) -> ProcessJob:
        request_path = self._work_dir / "request.json"
        request_path.write_text(json.dumps(self._request), encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MODULE_DIR), env.get("PYTHONPATH")]))
        with open(self._work_dir / "worker.log", "wb") as log:
            self._process = subprocess.Popen([self._python, "-m", "DafneSlicerLib.worker", str(request_path)],
                                             stdout=subprocess.PIPE, stderr=log, env=env, cwd=self._work_dir)
        os.set_blocking(self._process.stdout.fileno(), False)
        return self

    def cancel(self) -> None:
        """Stop the worker now (SIGTERM, which the worker turns into SystemExit so its atomic writes
        clean up); nothing half-written remains. A worker already committing its result finishes it."""
        self._cancelled = True
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def wait(self, timeout: float | None = None) -> JobStatus:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.poll()

    def poll(self) -> JobStatus:
        if self._status.done:
            return self._status
        exited = self._process.poll() is not None
        self._read_lines()
        if not exited:
            return self._status
        self._read_lines()
        self._process.stdout.close()
        self._status = self._final_status()
        return self._status

    def _read_lines(self) -> None:
        while True:
            try:
                chunk = os.read(self._process.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if not text.startswith(self._mark):
                continue
            message = json.loads(text[len(self._mark):])
            if "progress" in message:
                self._status = JobStatus(message["progress"], message["message"], done=False)
            else:
                self._final = message

    def _final_status(self) -> JobStatus:
        fraction = self._status.fraction
        # A result line means the worker committed its outputs before Cancel reached it.
        if self._final is not None and "result" in self._final:
            return JobStatus(1.0, _done_message(self.name, self._cancelled), done=True, result=self._final["result"])
        if self._cancelled:
            return JobStatus(fraction, f"{self.name} cancelled; nothing was changed", done=True, cancelled=True)
        if self._final is not None:
            error = self._final["error"] if self._final["details"] is None else f"{self.name} failed: {self._final['error']}"
            return JobStatus(fraction, error, done=True, error=error, details=self._final["details"])
        log = (self._work_dir / "worker.log").read_text("utf-8", "replace").strip().splitlines()
        last = log[-1] if log else "no output"
        return JobStatus(fraction, last, done=True, error=f"{self.name} stopped unexpectedly (exit code "
                         f"{self._process.returncode}): {last}", details="\n".join(log[-30:]))
