"""Cancel: through a launcher that passes no signal on, the whole worker ends and nothing is written;
after the work is done, the result is reported; a cancelled worker cleans up its temporary outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from DafneSlicerLib.jobs import KILL_AFTER_S, BackgroundJob, ProcessJob
from DafneSlicerLib.processes import popen_options

MODULE_DIR = Path(__file__).resolve().parents[1] / "DafneSlicer"


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_background_job_cancelled_after_its_result_exists_reports_the_result():
    saved, cancelled = threading.Event(), threading.Event()

    def finetune(progress, cancel):
        saved.set()  # e.g. the improved model is on disk now
        cancelled.wait(5)
        return {"model": "thigh-1.local"}

    job = BackgroundJob("Improving", finetune).start()
    saved.wait(5)
    job.cancel()
    cancelled.set()
    status = job.wait(5)
    assert status.done and not status.cancelled and status.result == {"model": "thigh-1.local"}
    assert "nothing was changed" not in status.message and "finished" in status.message


def test_process_job_cancelled_after_the_worker_reported_its_result_reports_the_result(tmp_path):
    fake_python = tmp_path / "fake-python"  # a "worker" that reports, then lingers until terminated
    fake_python.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo 'DAFNE {"result": {"improvement": "saved"}}'
        touch reported
        exec sleep 60
        """))
    fake_python.chmod(0o755)
    job = ProcessJob("Improving", {"work_dir": str(tmp_path), "task": "finetune"}, python=str(fake_python)).start()
    _wait_for(tmp_path / "reported")
    job.cancel()
    status = job.wait(30)
    assert status.done and not status.cancelled and status.result == {"improvement": "saved"}
    assert "nothing was changed" not in status.message


def test_a_garbled_progress_line_is_skipped_and_the_job_ends_with_its_result(tmp_path):
    """A worker line the panel cannot read (a library printing our mark, a cut line) must not raise from
    the panel's timer: it is logged and skipped; the job's end still decides."""
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo 'DAFNE {"progress": 0.5'
        echo 'DAFNE [1, 2]'
        echo 'DAFNE {"progress": "half"}'
        echo 'DAFNE {"progress": 0.7, "message": "segmenting"}'
        echo 'DAFNE {"result": {"labels": "done"}}'
        """))
    fake_python.chmod(0o755)
    job = ProcessJob("Segmenting", {"work_dir": str(tmp_path), "task": "segment"}, python=str(fake_python)).start()
    status = job.wait(30)
    assert status.done and status.error is None and status.result == {"labels": "done"}


WORKER_SCRIPT = """
import signal, sys, time
from pathlib import Path
from dafne_logic.core.atomic import atomic_directory
from DafneSlicerLib import worker

def run_request(request, progress, cancel, *args, **kwargs):
    work_dir = Path(request["work_dir"])
    if request["task"] == "commit":
        worker.TERMINATION.commit()
    if request["task"] == "deaf":  # stuck where no request to stop reaches it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with atomic_directory(work_dir / "out" / "model", marker="manifest.json", what="a model package folder") as tmp:
        (tmp / "weights").write_bytes(b"x" * 100)
        (work_dir / "ready").touch()
        while not (work_dir / "go").exists():  # never asks cancel(), like a long native call
            time.sleep(0.02)
    return {"saved": True}

worker.run_request = run_request
sys.exit(worker.main(sys.argv[1:]))
"""


def _start_worker(tmp_path: Path, task: str) -> subprocess.Popen:
    (tmp_path / "request.json").write_text(json.dumps({"task": task, "work_dir": str(tmp_path)}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "request.json")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_worker_turns_sigterm_into_exit_so_atomic_outputs_are_removed(tmp_path):
    process = _start_worker(tmp_path, "work")
    _wait_for(tmp_path / "ready")
    assert len(list((tmp_path / "out").iterdir())) == 1  # the temporary folder
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert list((tmp_path / "out").iterdir()) == []  # neither the model nor its temporary folder
    assert "DAFNE" not in stdout


def test_worker_committing_its_result_finishes_and_reports_it_despite_sigterm(tmp_path):
    process = _start_worker(tmp_path, "commit")
    _wait_for(tmp_path / "ready")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the signal is handled (ignored) while the worker waits
    (tmp_path / "go").touch()
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
    assert 'DAFNE {"result": {"saved": true}}' in stdout


# --- through a launcher ---------------------------------------------------------------------------

LAUNCHER_SCRIPT = """
import signal, subprocess, sys
# Like CTKAppLauncher's PythonSlicer: starts the real interpreter as a child, passes no signal on (it
# ignores SIGTERM) and exits with the child's status; the child's stdin is the launcher's own pipe, not
# its caller's; stdout and stderr are forwarded (inherited).
signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = sys.argv[1:]
if args[:2] == ["-m", "DafneSlicerLib.worker"]:
    args = [WORKER_FILE, *args[2:]]  # the worker, its task replaced by one that blocks
child = subprocess.Popen([PYTHON, *args], stdin=subprocess.PIPE, start_new_session=OWN_SESSION)
open("worker.pid", "w").write(str(child.pid))
sys.exit(child.wait())
"""


def _launcher(tmp_path: Path, own_session: bool = False) -> Path:
    """A launcher stand-in; ``own_session``: the interpreter it starts is out of reach of the caller's
    process-group signals (as on Windows, where there are none)."""
    worker_file = tmp_path / "blocking_worker.py"
    worker_file.write_text(WORKER_SCRIPT)
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f"#!{sys.executable}\nWORKER_FILE, PYTHON, OWN_SESSION = {str(worker_file)!r}, "
                        f"{sys.executable!r}, {own_session!r}\n" + LAUNCHER_SCRIPT)
    launcher.chmod(0o755)
    return launcher


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # an exited orphan may wait as a zombie for a reaper
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _cancel_within_5_s(tmp_path: Path, task: str, own_session: bool = False):
    job = ProcessJob("Improving", {"work_dir": str(tmp_path), "task": task},
                     python=str(_launcher(tmp_path, own_session))).start()
    try:
        _wait_for(tmp_path / "ready")
        assert len(list((tmp_path / "out").iterdir())) == 1  # the model's temporary folder
        began = time.monotonic()
        job.cancel()
        status = job.wait(5)
        assert status.done and status.cancelled, status
        assert time.monotonic() - began < 5
        assert not _running(int((tmp_path / "worker.pid").read_text()))  # the interpreter, not only the launcher
    finally:
        (tmp_path / "go").touch()  # a worker still alive would now save the model (and end: no orphan)
    time.sleep(0.3)
    return status


@pytest.mark.parametrize("own_session", [False, True], ids=["same-process-group", "out-of-reach-of-signals"])
def test_cancel_through_a_launcher_that_passes_no_signal_ends_the_worker_and_writes_nothing(tmp_path, own_session):
    status = _cancel_within_5_s(tmp_path, "work", own_session)
    assert "cancelled; nothing was changed" in status.message
    assert list((tmp_path / "out").iterdir()) == []  # neither the model nor its temporary folder


def test_cancel_kills_the_whole_tree_of_a_worker_that_ignores_every_request_to_stop(tmp_path):
    _cancel_within_5_s(tmp_path, "deaf")
    assert not (tmp_path / "out" / "model").exists()


def test_cancel_while_the_worker_commits_its_result_reports_the_result(tmp_path):
    job = ProcessJob("Improving", {"work_dir": str(tmp_path), "task": "commit"},
                     python=str(_launcher(tmp_path))).start()
    _wait_for(tmp_path / "ready")
    job.cancel()
    time.sleep(KILL_AFTER_S + 0.5)
    assert not job.poll().done  # not killed: it announced that it is saving a result
    (tmp_path / "go").touch()
    status = job.wait(30)
    assert status.done and not status.cancelled and status.result == {"saved": True}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]


def test_worker_stops_when_its_stdin_closes(tmp_path):
    """The GUI closing the pipe (Cancel) or the GUI process going away ends the worker."""
    (tmp_path / "request.json").write_text(json.dumps({"task": "work", "work_dir": str(tmp_path),
                                                       "stop_when_stdin_closes": True}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "request.json")], cwd=tmp_path,
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdin.write("dafne-worker-stdin\n")  # what ProcessJob writes first: this pipe is the GUI's
    process.stdin.flush()
    _wait_for(tmp_path / "ready")
    process.stdin.close()
    assert process.wait(timeout=5) != 0, process.stderr.read()
    assert "DAFNE {\"result\"" not in process.stdout.read()
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_stdin_from_a_launcher_does_not_stop_the_worker(tmp_path):
    """A launcher may give the interpreter a stdin of its own that is at end-of-file from the start."""
    (tmp_path / "request.json").write_text(json.dumps({"task": "work", "work_dir": str(tmp_path),
                                                       "stop_when_stdin_closes": True}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "request.json")], cwd=tmp_path,
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for(tmp_path / "ready")
    time.sleep(0.5)
    (tmp_path / "go").touch()
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and 'DAFNE {"result": {"saved": true}}' in stdout, stderr


def test_worker_processes_start_hidden_on_windows_and_in_their_own_group_elsewhere(monkeypatch):
    class StartupInfo:  # subprocess.STARTUPINFO exists only on Windows
        dwFlags, wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    windows = popen_options("nt")
    assert windows["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
    assert windows["startupinfo"].dwFlags & 1 and windows["startupinfo"].wShowWindow == 0  # SW_HIDE
    assert popen_options("posix") == {"start_new_session": True}


def test_on_windows_cancel_ends_the_tree_with_taskkill_and_asks_no_signal(monkeypatch):
    from types import SimpleNamespace

    from DafneSlicerLib import processes

    class StartupInfo:
        dwFlags, wShowWindow = 0, 1

    ran = []
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    monkeypatch.setattr(processes, "os", SimpleNamespace(name="nt"))
    monkeypatch.setattr(processes.subprocess, "run", lambda args, **kwargs: ran.append((args, kwargs)))
    worker = SimpleNamespace(pid=4242)
    processes.signal_tree(worker, terminate=True)  # Windows has no polite tree signal: the cancel file asks
    assert ran == []
    processes.signal_tree(worker)
    (args, kwargs), = ran
    assert args == ["taskkill", "/T", "/F", "/PID", "4242"] and kwargs["creationflags"] & 0x08000000  # hidden too
