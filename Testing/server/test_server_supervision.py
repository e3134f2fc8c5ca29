"""The merge worker beside the API: supervised (restarted when it dies or stops making progress),
reported by /healthz, and never outliving its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests
import sqlalchemy as sa

from dafne_logic.core.client_config import ClientConfig
from dafne_logic.learning.delta import DeltaMetadata, encode_delta, make_delta
from dafne_logic.learning.federated_client import FederatedClient
from dafne_server.config import ServerSettings
from dafne_server.db import MergeLease, UpdateRow, User
from dafne_server.heartbeat import heartbeat_dir, merge_worker_health, read_heartbeats
from dafne_server.runner import prepare
from dafne_server.testing import LocalServer

posix_signals = pytest.mark.skipif(os.name != "posix", reason="SIGKILL of single processes (POSIX)")


def _delta_blob(base, seed: int) -> bytes:
    import torch

    g = torch.Generator().manual_seed(seed)
    return encode_delta(make_delta(base, {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child nobody has reaped yet (containers' PID 1 may never reap) is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _live_pids(settings: ServerSettings, max_age_s: float = 1.5) -> set[int]:
    return {r["pid"] for r in read_heartbeats(settings) if time.time() - r["beat"] <= max_age_s}


def test_healthz_tells_starting_missing_stuck_and_ok_workers_apart(tmp_path):
    settings = ServerSettings(data_dir=str(tmp_path), worker_missing_after_s=10, worker_stuck_after_s=100)
    t = 1_000_000.0
    assert merge_worker_health(settings, api_started=t - 5, at=t)["state"] == "starting"
    assert merge_worker_health(settings, api_started=t - 60, at=t)["state"] == "missing"
    heartbeat_dir(settings).mkdir()

    def write(name: str, beat: float, progress: float, state: str = "idle") -> None:
        (heartbeat_dir(settings) / f"{name}.json").write_text(json.dumps(
            {"pid": 1, "host": "h", "beat": beat, "progress": progress, "state": state}))

    write("dead", beat=t - 30, progress=t - 30)  # a killed worker's file: stale, ignored
    assert merge_worker_health(settings, api_started=t - 60, at=t)["state"] == "missing"
    write("live", beat=t - 1, progress=t - 2)
    assert merge_worker_health(settings, api_started=t - 60, at=t) == {"state": "ok", "workers": 1, "detail": "idle"}
    write("live", beat=t - 1, progress=t - 500, state="merging leg")
    stuck = merge_worker_health(settings, api_started=t - 60, at=t)
    assert stuck["state"] == "stuck" and "'merging leg' for 500 s" in stuck["detail"]
    (heartbeat_dir(settings) / "torn.json").write_text("{")  # half-written: skipped, not a 500
    assert merge_worker_health(settings, api_started=t - 60, at=t)["state"] == "stuck"


def test_healthz_answers_503_over_http_when_no_worker_reports(tmp_path):
    import threading

    import uvicorn

    from dafne_server.app import create_app
    from dafne_server.testing import free_port

    settings = ServerSettings(data_dir=str(tmp_path / "data"), worker_missing_after_s=0.5)  # e.g. --no-merge-worker
    prepare(settings).dispose()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, 30, "uvicorn")
        health = f"http://127.0.0.1:{server.config.port}/healthz"
        first = requests.get(health, timeout=10)
        assert first.status_code == 200 and first.json()["merge_worker"]["state"] == "starting"
        reply = _wait(lambda: (r := requests.get(health, timeout=10)).status_code == 503 and r.json(), 10, "missing")
        assert reply["status"] == "degraded" and reply["merge_worker"]["state"] == "missing"
    finally:
        server.should_exit = True
        thread.join()


@posix_signals
def test_merge_worker_is_restarted_when_killed_or_stuck_and_healthz_says_so(tmp_path, tiny_leg):
    server = LocalServer(tmp_path / "data", validation="none", families={"leg": tiny_leg}, merge={"buffer_size": 1},
                         run_args=["--worker-missing-after", "2", "--worker-stuck-after", "4",
                                   "--merge-hold", "60", "--lease-ttl", "2"])
    health = f"{server.url}/healthz"

    def worker_state() -> str:
        return requests.get(health, timeout=10).json()["merge_worker"]["state"]

    try:
        server.start()
        _wait(lambda: worker_state() == "ok", 60, "the merge worker's first heartbeat")
        (first,) = _live_pids(server.settings)
        os.kill(first, signal.SIGKILL)
        second = _wait(lambda: _live_pids(server.settings) - {first}, 60, "a restarted worker")
        assert not _alive(first) and requests.get(health, timeout=10).ok

        # A merge that holds its lease for 60 s makes no progress for longer than 4 s: stuck.
        client = FederatedClient(ClientConfig(server.url, server.admin_token, opt_in=True))
        client.push(_delta_blob(tiny_leg.state_dict, 1), DeltaMetadata("leg", "1", 3, {}))
        body = _wait(lambda: (r := requests.get(health, timeout=10)).status_code == 503 and r.json(), 60,
                     "a stuck report")  # (a Response is falsy when not ok: return its body)
        assert body["status"] == "degraded" and body["merge_worker"]["state"] == "stuck"
        assert "merging leg" in body["merge_worker"]["detail"]
        third = _wait(lambda: _live_pids(server.settings) - {first} - second, 60, "the stuck worker replaced")
        assert all(not _alive(pid) for pid in second)
    finally:
        server.stop()
    _wait(lambda: not any(_alive(pid) for pid in third), 20, "the worker to stop with its server")


@posix_signals
def test_merge_worker_exits_mid_merge_when_its_parent_dies(tmp_path, tiny_leg):
    settings = ServerSettings(data_dir=str(tmp_path / "data"), validation="none", merge_hold_s=120,
                              poll_interval_s=0.2, merge={"buffer_size": 1})
    storage = prepare(settings)
    try:
        blob = _delta_blob(tiny_leg.state_dict, 1)
        with storage.session.begin() as session:
            storage.add_family(session, "leg", tiny_leg, "test")
            user = User(name="site")
            session.add(user)
            session.flush()
            session.add(UpdateRow(id=uuid.uuid4().hex, family="leg", user_id=user.id, idempotency_key="k",
                                  parent_version=1, n_slices=3, client_dice={}, client_version="",
                                  blob_sha256=storage.blobs.put(blob), blob_size=len(blob), norm=0.0,
                                  status="buffered", reason=""))
        parent = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\n"
             "from dafne_server.config import ServerSettings\n"
             "from dafne_server.runner import start_merge_worker\n"
             "print(start_merge_worker(ServerSettings.from_json(sys.argv[1])).pid, flush=True)\n"
             "time.sleep(600)", settings.to_json()], stdout=subprocess.PIPE, text=True)
        worker = int(parent.stdout.readline())

        def merging() -> bool:
            with storage.session() as session:
                return session.get(MergeLease, "leg").holder is not None

        _wait(merging, 60, "the merge to start")  # it now holds the lease for 120 s
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        _wait(lambda: not _alive(worker), 15, "the orphaned worker to exit")
        assert time.monotonic() - killed < 15
        with storage.session() as session:  # cut short: nothing published, nothing lost
            assert session.scalar(sa.select(UpdateRow.status)) == "buffered"
    finally:
        storage.dispose()


def test_the_supervisor_reads_only_its_own_host_s_heartbeat_of_its_worker_s_pid(tmp_path):
    """Hosts sharing one data folder (containers) give their workers the same pid: another host's
    slow merge must not get this host's healthy worker killed."""
    import socket
    from types import SimpleNamespace

    from dafne_server.runner import MergeWorkerSupervisor

    settings = ServerSettings(data_dir=str(tmp_path), worker_stuck_after_s=100)
    heartbeat_dir(settings).mkdir()
    now = time.time()

    def write(name: str, host: str, progress: float) -> None:
        (heartbeat_dir(settings) / f"{name}.json").write_text(json.dumps(
            {"pid": 7, "host": host, "beat": now, "progress": progress, "state": "merging leg"}))

    supervisor = MergeWorkerSupervisor(settings)
    supervisor.process = SimpleNamespace(pid=7)  # never started: only its reading of heartbeats is tested
    write("other-host", "another-container", progress=now - 5000)  # stuck, but not ours
    write("this-host", socket.gethostname(), progress=now - 1)
    assert supervisor._stuck() is None
    write("this-host", socket.gethostname(), progress=now - 500)
    assert supervisor._stuck() == pytest.approx(500, abs=5)
