"""`LocalServer` (the demo's and the tests' real server) stops on Windows too, where there are no
process groups, `os.killpg` or `signal.SIGKILL`."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import dafne_server.testing as local


def test_stop_and_kill_end_the_api_process_without_posix_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "os", SimpleNamespace(name="nt"))  # no killpg: calling it would fail
    monkeypatch.setattr(local, "signal", SimpleNamespace())  # no SIGKILL / SIGTERM either
    for method in ("stop", "kill"):
        server = local.LocalServer(tmp_path / method)
        server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        getattr(server, method)()
        assert server.process.poll() is not None, method
