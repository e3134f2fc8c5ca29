"""The upload path under attack, over real HTTP on SQLite and PostgreSQL (issue 14 items 1, 3, 6,
7, 9): hostile headers and trailing bytes are refused with 4xx and audited, an idempotency key
cannot be reused for another upload, the hourly limit holds under concurrent uploads, and a delta
against a rolled-back version is refused."""

from __future__ import annotations

import http.client
import json
import os
import struct
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import sqlalchemy as sa
from test_server_api import bearer, new_user, noisy_delta, upload

from dafne_logic.learning.delta import encode_delta
from dafne_server.auth import create_user
from dafne_server.uploads import THROTTLED_AUDITS_PER_MINUTE, UploadRefused, UploadSlots


def _audit(server, actor_token: str) -> list[dict]:
    name = requests.get(f"{server.url}/v1/me", headers=bearer(actor_token), timeout=10).json()["name"]
    rows = requests.get(f"{server.url}/v1/admin/audit", params={"limit": 1000},
                        headers=bearer(server.admin_token), timeout=10).json()
    return [a for a in rows if a["actor"] == name]


def _header_only(header: bytes) -> bytes:
    return zlib.compress(struct.pack("<Q", len(header)) + header)


def _buffered(server, token: str, family: str) -> int:
    return requests.get(f"{server.url}/v1/models/{family}", headers=bearer(token), timeout=10).json()["buffered_updates"]


def test_hostile_headers_and_huge_numbers_get_4xx_never_500(live_server, tiny_leg):
    token = new_user(live_server)
    name = next(iter(tiny_leg.state_dict))
    hostile = {
        "integer shape": _header_only(json.dumps({name: {"dtype": "F16", "shape": 7, "data_offsets": [0, 14]}}).encode()),
        "null shape": _header_only(json.dumps({name: {"dtype": "F16", "shape": None, "data_offsets": [0, 0]}}).encode()),
        "deep nesting": _header_only(b"[" * 200_000 + b"]" * 200_000),
        "bomb with a malformed header": zlib.compress(struct.pack("<Q", 9) + b"{nonsense" + b"\0" * (60 << 20), 9),
    }
    for what, blob in hostile.items():
        r = upload(live_server, token, "uploads", blob)
        assert r.status_code == 422, (what, r.status_code, r.text)
    assert len([a for a in _audit(live_server, token) if a["action"] == "update_refused"]) == len(hostile)
    r = requests.post(f"{live_server.url}/v1/admin/models/uploads/activate", json={"version": 2**40},
                      headers=bearer(live_server.admin_token), timeout=10)
    assert r.status_code == 422, r.text
    for attempt in (
        requests.patch(f"{live_server.url}/v1/admin/models/uploads/settings", data='{"clip_norm": Infinity}',
                       headers={**bearer(live_server.admin_token), "Content-Type": "application/json"}, timeout=10),
        requests.post(f"{live_server.url}/v1/admin/models/uploads/activate", data='{"version": NaN}',
                      headers={**bearer(live_server.admin_token), "Content-Type": "application/json"}, timeout=10),
        requests.get(f"{live_server.url}/v1/admin/audit", params={"after_id": 2**40},
                     headers=bearer(live_server.admin_token), timeout=10),
    ):
        assert attempt.status_code == 422, attempt.text
    assert upload(live_server, token, "nosuchfamily", b"x").status_code == 404
    huge_id = "dft_99999999999_" + "x" * 43  # a token id beyond PostgreSQL's INTEGER
    assert requests.get(f"{live_server.url}/v1/me", headers=bearer(huge_id), timeout=10).status_code == 401
    r = requests.delete(f"{live_server.url}/v1/admin/tokens/99999999999", headers=bearer(live_server.admin_token),
                        timeout=10)
    assert r.status_code == 422, r.text
    assert any(a["action"] == "update_refused" and a["detail"]["status"] == 404 for a in _audit(live_server, token))


def test_bytes_after_the_zlib_stream_are_refused_and_not_stored(live_server, tiny_leg):
    token = new_user(live_server)
    before = _buffered(live_server, token, "uploads")
    good = encode_delta(noisy_delta(tiny_leg.state_dict, seed=3))
    r = upload(live_server, token, "uploads", good + os.urandom(200_000))
    assert r.status_code == 422 and "after the end of its zlib stream" in r.json()["detail"], r.text
    assert _buffered(live_server, token, "uploads") == before


def test_an_idempotency_key_reused_for_another_upload_is_a_conflict(live_server, tiny_leg):
    token = new_user(live_server)
    key = uuid.uuid4().hex
    blob = encode_delta(noisy_delta(tiny_leg.state_dict, seed=11))
    first = upload(live_server, token, "uploads", blob, idempotency_key=key)
    assert first.status_code == 202, first.text
    assert upload(live_server, token, "uploads", blob, idempotency_key=key).status_code == 200  # a retry
    other = encode_delta(noisy_delta(tiny_leg.state_dict, seed=12))
    for what, response in [
        ("another delta", upload(live_server, token, "uploads", other, idempotency_key=key)),
        ("garbage", upload(live_server, token, "uploads", b"garbage", idempotency_key=key)),
        ("another family", upload(live_server, token, "inputs", blob, idempotency_key=key)),
        ("other metadata", upload(live_server, token, "uploads", blob, idempotency_key=key, n_slices=9)),
    ]:
        assert response.status_code == 409 and "idempotency key" in response.json()["detail"], (what, response.text)
    assert _buffered(live_server, token, "inputs") >= 0
    mine = requests.get(f"{live_server.url}/v1/me", headers=bearer(token), timeout=10).json()
    assert mine["updates"] == 1  # nothing of the replays was stored


def test_a_delta_against_a_rolled_back_version_is_refused(live_server, tiny_leg):
    admin = bearer(live_server.admin_token)
    token = new_user(live_server)
    base = f"{live_server.url}/v1/admin/models/rollback"
    pushed = upload(live_server, token, "rollback", encode_delta(noisy_delta(tiny_leg.state_dict, seed=21)))
    assert pushed.status_code == 202, pushed.text
    assert requests.post(f"{base}/merge", headers=admin, timeout=10).status_code == 202
    deadline = time.monotonic() + 90
    while (state := requests.get(f"{live_server.url}/v1/updates/{pushed.json()['id']}", headers=bearer(token),
                                 timeout=10).json())["status"] == "buffered":
        assert time.monotonic() < deadline, "the forced merge never ran"
        time.sleep(0.2)
    newer = state["merged_into"]
    assert newer == 2, state
    assert requests.post(f"{base}/activate", json={"version": 1}, headers=admin, timeout=10).status_code == 200
    r = upload(live_server, token, "rollback", encode_delta(noisy_delta(tiny_leg.state_dict, seed=22)),
               parent_version=str(newer))
    assert r.status_code == 409 and "not in the history" in r.json()["detail"], r.text
    assert upload(live_server, token, "rollback", encode_delta(noisy_delta(tiny_leg.state_dict, seed=23)),
                  parent_version="1").status_code == 202


@pytest.fixture(params=["sqlite", "postgresql"])
def limits_server(request, tmp_path, tiny_leg):
    """A server with a low hourly limit and room for many concurrent uploads per user."""
    from dafne_server.testing import LocalServer

    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres_schema_factory")()
    server = LocalServer(tmp_path / "server", database_url=url, families={"leg": tiny_leg},
                         merge={"buffer_size": 50, "dice_tolerance": 0.05, "label_tolerance": 0.5}, validation="none",
                         run_args=["--uploads-per-hour", "3", "--max-concurrent-uploads", "32",
                                   "--max-concurrent-uploads-per-user", "32"]).start()
    yield server
    server.stop()


def test_the_hourly_limit_holds_under_concurrent_uploads(limits_server, tiny_leg):
    token = new_user(limits_server)
    blobs = [encode_delta(noisy_delta(tiny_leg.state_dict, seed=100 + i)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        statuses = sorted(pool.map(lambda blob: upload(limits_server, token, "leg", blob).status_code, blobs))
    assert statuses == [202] * 3 + [429] * 9, statuses
    throttled = [a for a in _audit(limits_server, token) if a["action"] == "update_throttled"]
    assert len(throttled) == 9  # audited, but not counted towards the refused-upload limit


def test_a_client_ignoring_429s_cannot_grow_the_audit_log_at_its_request_rate(limits_server, tiny_leg):
    token = new_user(limits_server)
    statuses = [upload(limits_server, token, "leg", encode_delta(noisy_delta(tiny_leg.state_dict, seed=200 + i))).status_code
                for i in range(18)]
    assert statuses == [202] * 3 + [429] * 15
    throttled = [a for a in _audit(limits_server, token) if a["action"] == "update_throttled"]
    assert len(throttled) == THROTTLED_AUDITS_PER_MINUTE  # the other 5 only logged


def test_upload_slots_cap_uploads_per_user_and_in_total():
    slots = UploadSlots(total=3, per_user=2)
    with slots.slot("a"), slots.slot("a"):
        with pytest.raises(UploadRefused, match="per user") as refused:
            with slots.slot("a"):
                pass
        assert refused.value.status == 429 and refused.value.throttled
        with slots.slot("b"):
            with pytest.raises(UploadRefused, match="too many uploads"):
                with slots.slot("c"):
                    pass
    with slots.slot("a"), slots.slot("a"), slots.slot("c"):  # every slot was given back
        pass


def test_percent_encoded_tokens_are_redacted_from_the_access_log(live_server):
    token = new_user(live_server)
    encoded = token.replace("_", "%5F").replace("-", "%2D")
    connection = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)  # requests would decode it
    connection.request("GET", f"/v1/me?token={encoded}&mark={uuid.uuid4().hex}")
    assert connection.getresponse().status == 401
    connection.close()
    deadline = time.monotonic() + 10
    while "token=dft_<redacted>&mark" not in (log := live_server.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the access log line never appeared"
        time.sleep(0.1)
    assert token.split("_", 2)[2][:20] not in log.replace("%2D", "-")


def test_server_failures_are_503_and_do_not_use_up_the_refused_upload_budget(tmp_path, tiny_leg, monkeypatch):
    """A full disk answers 503 with Retry-After, audited apart from refusals: once the disk has room,
    the same site's upload is accepted, not locked out for an hour by the server's own failures."""
    from test_server_dashboard import _in_thread

    from dafne_server.app import create_app
    from dafne_server.blobs import BlobStore
    from dafne_server.config import ServerSettings
    from dafne_server.db import AuditEntry
    from dafne_server.runner import prepare

    settings = ServerSettings(data_dir=str(tmp_path / "data"), refused_uploads_per_hour=2)
    storage = prepare(settings)
    with storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
        token = create_user(session, "site")
    storage.dispose()

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    blob = encode_delta(noisy_delta(tiny_leg.state_dict, seed=31))
    server = SimpleNamespace(admin_token="", url="")
    with _in_thread(create_app(settings)) as url:
        server.url = url
        with monkeypatch.context() as patch:
            patch.setattr(BlobStore, "put", disk_full)
            for _ in range(3):
                r = upload(server, token, "leg", blob)
                assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.text
                assert "retry later" in r.json()["detail"]
        assert upload(server, token, "leg", blob).status_code == 202
    storage = prepare(settings)
    with storage.read() as session:
        actions = [a.action for a in session.scalars(sa.select(AuditEntry).where(AuditEntry.actor == "site"))]
    storage.dispose()
    assert actions.count("update_failed") == 3 and "update_refused" not in actions


def test_a_refusal_that_cannot_be_audited_for_a_locked_database_is_503_not_500(tmp_path, tiny_leg, monkeypatch):
    """Every refusal is audited before it is answered; the database being locked then is the server's
    failure, which the client retries (503 with Retry-After), not an internal error."""
    from sqlalchemy.exc import OperationalError
    from test_server_dashboard import _in_thread

    from dafne_server import uploads
    from dafne_server.app import create_app
    from dafne_server.config import ServerSettings
    from dafne_server.runner import prepare

    settings = ServerSettings(data_dir=str(tmp_path / "data"))
    storage = prepare(settings)
    with storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
        token = create_user(session, "site")
    storage.dispose()

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO audit", {}, Exception("database is locked"))

    blob = encode_delta(noisy_delta(tiny_leg.state_dict, seed=32))
    server = SimpleNamespace(admin_token="", url="")
    with _in_thread(create_app(settings)) as url:
        server.url = url
        assert upload(server, token, "leg", blob, idempotency_key="short").status_code == 422  # refused, audited
        with monkeypatch.context() as patch:
            patch.setattr(uploads, "audit", locked)
            r = upload(server, token, "leg", blob, idempotency_key="short")
            assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.text
            assert upload(server, token, "nosuchfamily", blob).status_code == 503
