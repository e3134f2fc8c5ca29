"""Crashes, on SQLite and PostgreSQL: the whole server (API + merge worker) SIGKILLed during an
upload and during a merge, then restarted on the same data: no partial version, no accepted
update lost, the queue resumes."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid

import requests
import sqlalchemy as sa

from dafne_logic.core.client_config import ClientConfig
from dafne_logic.learning.delta import DeltaMetadata, encode_delta, make_delta
from dafne_logic.learning.federated_client import FederatedClient
from dafne_server.db import MergeLease, UpdateRow, Version
from dafne_server.storage import Storage
from dafne_server.testing import LocalServer


def _delta_blob(base, seed: int) -> bytes:
    import torch

    g = torch.Generator().manual_seed(seed)
    return encode_delta(make_delta(base, {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}))


def _half_sent_upload(server: LocalServer, token: str, blob: bytes) -> socket.socket:
    """Send the headers and half the body of a valid upload, and leave it hanging."""
    request = requests.Request(
        "POST", f"{server.url}/v1/models/leg/updates", headers={"Authorization": f"Bearer {token}"},
        files={"delta": ("d.zz", blob)},
        data={"metadata": json.dumps({"parent_version": "1", "n_slices": 2, "idempotency_key": uuid.uuid4().hex})},
    ).prepare()
    head = f"POST {request.path_url} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head.encode() + request.body[: len(request.body) // 2])
    return sock


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _complete_blobs(storage: Storage) -> bool:
    """Every visible blob is complete (its name is its content's sha256)."""
    return all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name
               for p in storage.blobs.root.glob("*/*") if not p.name.startswith("."))


def test_sigkill_during_upload_and_during_merge(tmp_path, tiny_leg, database_url):
    server = LocalServer(tmp_path / "data", database_url=database_url, validation="none", families={"leg": tiny_leg},
                         merge={"buffer_size": 2},
                         run_args=["--merge-hold", "3", "--lease-ttl", "1.5"])
    storage = Storage(server.settings)
    token = server.add_user("site")
    client = FederatedClient(ClientConfig(server.url, token, opt_in=True), backoff_s=0.05)

    def rows() -> dict[str, UpdateRow]:
        with storage.session() as session:
            return {r.id: r for r in session.scalars(sa.select(UpdateRow))}

    def versions() -> list[int]:
        with storage.session() as session:
            return list(session.scalars(sa.select(Version.number).order_by(Version.number)))

    try:
        server.start()
        accepted = client.push(_delta_blob(tiny_leg.state_dict, 1), DeltaMetadata("leg", "1", 3, {}))
        assert accepted["status"] == "buffered"

        # 1. killed while an upload is half received
        sock = _half_sent_upload(server, token, _delta_blob(tiny_leg.state_dict, 2))
        server.kill()
        sock.close()
        assert set(rows()) == {accepted["id"]} and rows()[accepted["id"]].status == "buffered"
        assert _complete_blobs(storage)

        # 2. restarted; the next upload completes the buffer (K = 2) and a merge starts
        server.start()
        second = client.push(_delta_blob(tiny_leg.state_dict, 3), DeltaMetadata("leg", "1", 3, {}))

        def merging() -> bool:
            with storage.session() as session:
                return session.get(MergeLease, "leg").holder is not None

        _wait(merging, 60, "the merge to start")
        server.kill()  # inside the merge (the worker holds the lease for 3 s before publishing)
        assert versions() == [1]  # no partial version
        assert {r.status for r in rows().values()} == {"buffered"} and len(rows()) == 2
        assert _complete_blobs(storage)

        # 3. restarted: the dead worker's lease expires and the same two updates are merged once
        server.start()
        done = [client.wait_for_update(u["id"], timeout_s=90) for u in (accepted, second)]
        assert [d["status"] for d in done] == ["merged", "merged"] and done[0]["merged_into"] == 2
        assert versions() == [1, 2]
        assert client.families()[0]["active_version"] == 2
        assert requests.get(f"{server.url}/healthz", timeout=10).ok
    finally:
        server.stop()
        storage.dispose()
