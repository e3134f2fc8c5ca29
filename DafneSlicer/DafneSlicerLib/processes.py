"""Starting and ending worker processes the same way on Linux, macOS and Windows.

Inside Slicer the worker is started through ``PythonSlicer``, a CTK application launcher: it sets
up the environment, starts the real interpreter (``python-real``) as a *child* and does not pass
signals on. Ending the launcher alone would leave the worker running, so a worker is started as
the head of its own process tree and ended as a whole:

- POSIX: in a new session (``start_new_session``), i.e. its own process group, which
  ``os.killpg`` signals as a whole, launcher and interpreter together.
- Windows: hidden (no console window, as ``slicer.util.launchConsoleProcess`` does; closing such a
  window would kill the job), and ended with ``taskkill /T /F``, which ends the whole tree.

Whether the whole tree is gone is told by the worker's stdout pipe (see ``ProcessJob``): every
process of the tree holds its write end, so it reads end-of-file only once all of them exited,
however they were reparented, with no process table to search.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

STARTF_USESHOWWINDOW = 0x00000001  # subprocess constants exist only on Windows; these are their values
SW_HIDE = 0
CREATE_NO_WINDOW = 0x08000000


def popen_options(os_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`subprocess.Popen` that start a process tree Cancel can end
    (``os_name``: an ``os.name`` value, this platform's by default)."""
    if (os_name or os.name) == "nt":
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        return {"startupinfo": info, "creationflags": CREATE_NO_WINDOW}
    return {"start_new_session": True}


def signal_tree(process: subprocess.Popen, terminate: bool = False) -> None:
    """Ask the whole tree to stop (``terminate``: SIGTERM, which the worker turns into a clean exit)
    or end it at once (POSIX SIGKILL of the process group; Windows ``taskkill /T /F``)."""
    if os.name == "nt":
        if not terminate:  # Windows has no polite signal for a tree; the worker's cancel file is that
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False,
                           **popen_options())
        return
    try:
        os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)  # pgid == pid: new session
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
