"""Long work (inference, fine-tuning, downloads) on a worker thread, polled from the GUI thread.

The worker never touches MRML or Qt: it gets plain inputs (SimpleITK images, model packages),
reports progress through a thread-safe slot and checks a cancel flag. The widget polls
:meth:`BackgroundJob.poll` from a ``qt.QTimer`` and, once done, converts the result to MRML on
the GUI thread, so the scene is changed only by the GUI thread and only with a complete result.
Torch releases the GIL in its kernels, so the GUI stays responsive while a job runs.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from dafne_logic.errors import Cancelled, DafneError

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]
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

    def start(self) -> "BackgroundJob":
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
            result = self._function(self._progress, self._cancel.is_set)
            if self._cancel.is_set():
                raise Cancelled(f"{self.name} cancelled; nothing was changed")
            final = JobStatus(1.0, f"{self.name}: done", done=True, result=result)
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
