"""Long work (inference, fine-tuning, sync) as jobs the GUI thread polls.

:class:`ProcessJob` (what the module uses) runs a :mod:`.worker` request in a separate Python
process: it does not compete with Slicer's GUI thread for Python's GIL and a crash cannot take
Slicer down. Cancel reaches the worker even behind Slicer's ``PythonSlicer`` launcher, which
passes no signals on (see :mod:`.processes`), and "cancelled" is reported only once the whole
process tree is gone, so nothing is written after it. :class:`BackgroundJob` runs a function on a
thread of this process (tests and plain-Python scripts). Both are polled: the widget calls
``poll()`` from a ``qt.QTimer`` and, once done, converts the result to MRML on the GUI thread,
so the scene changes only on the GUI thread and only with a complete result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dafne_logic.core.errors import Cancelled, DafneError
from dafne_logic.core.progress import CancelCheck, ProgressCallback

from .processes import popen_options, signal_tree

log = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds DafneSlicerLib/ (and dafne_logic/ when installed)

CANCEL_FILE = "cancel"  # created in the work folder on Cancel: the worker's signal to stop, through any launcher
KILL_AFTER_S = 2.0  # a worker still running this long after Cancel is killed, its whole process tree

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
    """Slicer's own Python launcher (right environment variables) when inside Slicer, else this interpreter.

    Slicer puts ``PythonSlicer`` on PATH, as ``slicer.util.pip_install`` relies on too. Inside Slicer
    ``sys.executable`` is the application itself, so falling back to it would start a second Slicer.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if getattr(sys.modules.get("slicer"), "app", None) is not None:  # the Slicer application, not slicer-core
        raise DafneError("Slicer's Python launcher (PythonSlicer) was not found on PATH, so the task cannot start; "
                         "reinstall Slicer or start it from its own launcher.")
    return sys.executable


class ProcessJob:
    """Runs ``python -m DafneSlicerLib.worker request.json`` and follows its progress lines without blocking.

    Cancel asks the worker to stop in three ways that need no signal to pass a launcher: a
    ``cancel`` file in the work folder, end-of-file on its stdin, and (POSIX) SIGTERM to its
    process group. A worker still running :data:`KILL_AFTER_S` later is killed with its whole tree,
    unless it announced that it is committing its result (then its result is reported).
    """

    def __init__(self, name: str, request: dict[str, Any], python: str | None = None):
        from .worker import MARK, STDIN_HELLO

        self.name = name
        self._mark = MARK
        self._hello = STDIN_HELLO
        self._work_dir = Path(request["work_dir"])
        self._request = {**request, "stop_when_stdin_closes": True}
        self._python = python or worker_python()
        self._status = JobStatus(0.0, f"{name}: starting", done=False)
        self._buffer = b""
        self._final: dict[str, Any] | None = None
        self._committing = False
        self._stdout_closed = False  # end-of-file: every process of the tree has exited
        self._cancelled_at: float | None = None
        self._killed = False
        self._process: subprocess.Popen | None = None

    def start(self) -> ProcessJob:
        request_path = self._work_dir / "request.json"
        request_path.write_text(json.dumps(self._request), encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MODULE_DIR), env.get("PYTHONPATH")]))
        with open(self._work_dir / "worker.log", "wb") as log:
            self._process = subprocess.Popen([self._python, "-m", "DafneSlicerLib.worker", str(request_path)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                             cwd=self._work_dir, **popen_options())
        os.set_blocking(self._process.stdout.fileno(), False)  # pipes on Windows too since Python 3.12
        try:  # tells the worker that its stdin is this pipe, whose end-of-file then means "stop"
            self._process.stdin.write(self._hello + b"\n")
            self._process.stdin.flush()
        except OSError:  # the worker died at once; poll() reports it
            pass
        return self

    def cancel(self) -> None:
        """Ask the worker to stop now; its atomic writes clean up and nothing half-written remains.
        A worker already committing its result finishes it and the result is reported."""
        if self._cancelled_at is not None or self._process is None:
            return
        self._cancelled_at = time.monotonic()
        if self._process.poll() is not None and self._stdout_closed:
            return
        (self._work_dir / CANCEL_FILE).touch()
        try:
            self._process.stdin.close()
        except OSError:  # the worker is gone already
            pass
        signal_tree(self._process, terminate=True)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Poll until the job ends or ``timeout`` seconds passed (scripts and tests; the GUI polls)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().done and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.poll()

    def poll(self) -> JobStatus:
        if self._status.done:
            return self._status
        exited = self._process.poll() is not None
        self._read_lines()
        if self._cancelled_at is not None and not self._stdout_closed and not self._committing \
                and not self._killed and time.monotonic() - self._cancelled_at > KILL_AFTER_S:
            signal_tree(self._process)  # it did not stop when asked: end the whole tree now
            self._killed = True
        if not exited or (self._cancelled_at is not None and not self._stdout_closed):
            return self._status  # after Cancel, "done" only once nothing of the tree can write any more
        self._read_lines()
        self._close_pipes()
        self._status = self._final_status()
        return self._status

    def _close_pipes(self) -> None:
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def _read_lines(self) -> None:
        while not self._stdout_closed:
            try:
                chunk = os.read(self._process.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self._stdout_closed = True
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if not text.startswith(self._mark):
                continue
            try:
                message = json.loads(text[len(self._mark):])
                if not isinstance(message, dict):
                    raise ValueError("not a JSON object")
                if "progress" in message:
                    self._status = JobStatus(float(message["progress"]), str(message["message"]), done=False)
                    continue
            except (ValueError, KeyError, TypeError) as exc:  # a garbled line: the job goes on, its end decides
                log.warning("%s: unreadable progress line from the worker (%s): %.200s", self.name, exc, text)
                continue
            if "committing" in message:
                self._committing = True
            else:
                self._final = message

    def _final_status(self) -> JobStatus:
        fraction = self._status.fraction
        cancelled = self._cancelled_at is not None
        # A result line means the worker committed its outputs before Cancel reached it.
        if self._final is not None and "result" in self._final:
            return JobStatus(1.0, _done_message(self.name, cancelled), done=True, result=self._final["result"])
        if cancelled:
            return JobStatus(fraction, f"{self.name} cancelled; nothing was changed", done=True, cancelled=True)
        if self._final is not None:
            error = self._final["error"] if self._final["details"] is None else f"{self.name} failed: {self._final['error']}"
            return JobStatus(fraction, error, done=True, error=error, details=self._final["details"])
        log = (self._work_dir / "worker.log").read_text("utf-8", "replace").strip().splitlines()
        last = log[-1] if log else "no output"
        return JobStatus(fraction, last, done=True, error=f"{self.name} stopped unexpectedly (exit code "
                         f"{self._process.returncode}): {last}", details="\n".join(log[-30:]))
