"""Cancel after the work is done: the result is reported; a cancelled worker cleans up its temporary outputs."""

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

MODULE_DIR = Path(__file__).resolve().parents[1] / "DafneSlicer"

from DafneSlicerLib.jobs import BackgroundJob, ProcessJob  # noqa: E402


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


WORKER_SCRIPT = """
import sys, time
from pathlib import Path
from dafne_logic.core.atomic import atomic_directory
from DafneSlicerLib import worker

def run_request(request, progress, cancel, *args, **kwargs):
    work_dir = Path(request["work_dir"])
    if request["task"] == "commit":
        worker.TERMINATION.commit()
    with atomic_directory(work_dir / "out" / "model") as tmp:
        (tmp / "weights").write_bytes(b"x" * 100)
        (work_dir / "ready").touch()
        while not (work_dir / "go").exists():
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
