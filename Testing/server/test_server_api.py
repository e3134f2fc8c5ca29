"""The /v1 API over real HTTP against `dafne-server run` on a loopback port, SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import pickle
import re
import socket
import struct
import time
import uuid
import zipfile
import zlib

import pytest
import requests
import torch
from safetensors.torch import save as save_safetensors_bytes

from dafne_logic.core.client_config import ClientConfig
from dafne_logic.core.paths import user_data_dir
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.learning.delta import DeltaMetadata, encode_delta, make_delta
from dafne_logic.learning.federated_client import FederatedClient, SyncError


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_user(server, admin: bool = False) -> str:
    name = f"u{uuid.uuid4().hex[:8]}"
    r = requests.post(f"{server.url}/v1/admin/users", json={"name": name, "admin": admin},
                      headers=bearer(server.admin_token), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def noisy_delta(base, scale: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return make_delta(base, {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()})


def upload(server, token: str, family: str, blob: bytes, /, **meta):
    metadata = {"parent_version": "1", "n_slices": 3, "dice_per_label": {"right soleus": 0.9},
                "idempotency_key": uuid.uuid4().hex, **meta}
    return requests.post(f"{server.url}/v1/models/{family}/updates", headers=bearer(token), timeout=30,
                         files={"delta": ("d.zz", blob, "application/octet-stream")},
                         data={"metadata": json.dumps(metadata)})


def client_for(server, token: str) -> FederatedClient:
    return FederatedClient(ClientConfig(server.url, token, opt_in=True), backoff_s=0.05)


def test_pull_push_merge_pull(live_server, tiny_leg, tmp_path):
    client = client_for(live_server, new_user(live_server))
    first = client.pull("leg", models_dir=tmp_path)
    assert ModelPackage.load(first).manifest.version == "1"
    assert client.pull("leg", models_dir=tmp_path) == first  # already there: nothing downloaded
    parent_sha = ModelPackage.load(first).manifest.weights_sha256  # what the server checks it against
    results = [client.push(encode_delta(noisy_delta(tiny_leg.state_dict, seed=i)),
                           DeltaMetadata("leg", "1", 4 + i, {"right soleus": 0.8, "left soleus": float("nan")},
                                         parent_sha256=parent_sha))
               for i in range(2)]  # K = 2: this completes a buffer
    assert all(r["status"] == "buffered" and not r["duplicate"] for r in results)
    infos = [client.wait_for_update(r["id"], timeout_s=90) for r in results]
    assert all(i["status"] == "merged" for i in infos), infos
    new_version = infos[0]["merged_into"]
    assert new_version >= 2
    pulled = ModelPackage.load(client.pull("leg", models_dir=tmp_path))
    assert pulled.manifest.version == str(new_version) and pulled.manifest.parent_version is not None
    versions = client.versions("leg")
    assert versions[-1]["active"] and versions[-1]["validation_mean_dice"] is not None
    # someone else's update is invisible to a contributor
    other = client_for(live_server, new_user(live_server))
    with pytest.raises(SyncError, match="404"):
        other.update_status(results[0]["id"])
    viewer = {"Authorization": f"Bearer {live_server.admin_token}"}  # the dashboard needs a token
    page = requests.get(live_server.url + "/", timeout=30, headers=viewer)
    assert page.status_code == 200 and "leg" in page.text and "/plots/leg/versions.png" in page.text
    for kind in ("versions", "client-dice", "contributions", "learning-curve"):
        png = requests.get(f"{live_server.url}/plots/leg/{kind}.png", timeout=30, headers=viewer)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_upload_is_idempotent(live_server, tiny_leg):
    token = new_user(live_server)
    blob = encode_delta(noisy_delta(tiny_leg.state_dict, seed=42))
    key = uuid.uuid4().hex
    first = upload(live_server, token, "inputs", blob, idempotency_key=key)
    again = upload(live_server, token, "inputs", blob, idempotency_key=key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}


def _foreign_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:  # the layout of a torch.save checkpoint
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return buffer.getvalue()


def _bad_deltas(base) -> dict[str, tuple[bytes, str]]:
    good = noisy_delta(base)
    name = next(iter(good))
    wrong_shape = {**good, name: torch.zeros(3, 3, dtype=torch.float16)}
    missing = {k: v for k, v in good.items() if k != name}
    nan = {**good, name: torch.full_like(good[name], float("nan"))}
    fp32 = zlib.compress(save_safetensors_bytes({k: v.float() for k, v in good.items()}))
    huge = {k: v * 1e3 for k, v in good.items()}
    return {
        "pickle": (pickle.dumps({"w": [1.0, 2.0]}), "pickle"),
        "torch zip": (_foreign_zip(), "zip"),
        "huge header": (zlib.compress(struct.pack("<Q", 1 << 40) + b"{}"), "header"),
        "malformed header": (zlib.compress(struct.pack("<Q", 5) + b"nope!"), "not JSON"),
        "not zlib": (b"\x00\x01garbage" * 10, "zlib"),
        "wrong shape": (encode_delta(wrong_shape), "shape"),
        "missing tensor": (encode_delta(missing), "names"),
        "NaN": (encode_delta(nan), "NaN"),
        "float32": (fp32, "float16"),
        "norm": (encode_delta(huge), "norm"),
    }


def test_bad_uploads_get_4xx_with_a_reason_and_nothing_is_stored(live_server, tiny_leg):
    token = new_user(live_server)
    good = encode_delta(noisy_delta(tiny_leg.state_dict))
    # This user's uploads, not the family's buffer: the server is shared with other test modules, whose
    # buffered updates may be merged while this test runs.
    assert requests.get(f"{live_server.url}/v1/me", headers=bearer(token), timeout=10).json()["updates"] == 0
    for what, (blob, reason) in _bad_deltas(tiny_leg.state_dict).items():
        r = upload(live_server, token, "inputs", blob)
        assert r.status_code == 422 and reason in r.json()["detail"], (what, r.status_code, r.text)
    metadata_cases = [
        ({"parent_version": "99"}, 422, "unknown"),
        ({"n_slices": 0}, 422, "n_slices"),
        ({"dice_per_label": {"right soleus": 7.0}}, 422, "Dice"),
        ({"idempotency_key": "short"}, 422, "idempotency_key"),
        ({"family": "thigh"}, 422, "family"),
        ({"extra": "field"}, 422, "extra"),
        ({"parent_sha256": "not-a-sha"}, 422, "parent_sha256"),
        ({"parent_sha256": "0" * 64}, 409, "other weights than version 1"),
    ]
    for meta, status, reason in metadata_cases:
        r = upload(live_server, token, "inputs", good, **meta)
        assert r.status_code == status and reason in r.json()["detail"], (meta, r.text)
    r = requests.post(f"{live_server.url}/v1/models/inputs/updates", headers=bearer(token), timeout=10,
                      files={"delta": ("d", good)}, data={"metadata": "{not json"})
    assert r.status_code == 422
    assert upload(live_server, token, "nosuchfamily", good).status_code == 404
    # oversized body (server limit 1 MiB): refused from the Content-Length before it is read
    r = upload(live_server, token, "inputs", b"\0" * (2 << 20))
    assert r.status_code == 413 and "larger" in r.json()["detail"]
    r = requests.post(f"{live_server.url}/v1/models/inputs/updates", headers=bearer(token), timeout=10,
                      data=iter([b"x" * 1000]))  # chunked, no length
    assert r.status_code == 411
    # Every other route takes small bodies only: FastAPI reads a body before the login check, so a
    # client without a token must not make the server hold an upload's worth on a JSON or form route.
    for path in ("/v1/admin/users", "/login"):
        r = requests.post(f"{live_server.url}{path}", timeout=10, data=b"{" + b" " * (100 << 10) + b"}",
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "65536" in r.json()["detail"], (path, r.status_code)
    r = requests.post(f"{live_server.url}/v1/admin/users", timeout=10, json={"name": "x" * 1000})
    assert r.status_code == 401  # a small body still reaches the login check
    assert requests.get(f"{live_server.url}/v1/me", headers=bearer(token), timeout=10).json()["updates"] == 0
    assert requests.get(f"{live_server.url}/healthz", timeout=10).json()["status"] == "ok"


def _read_response(connection: socket.socket) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) from ``connection``; b"" on a timeout."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(4096)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            chunk = connection.recv(4096)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except TimeoutError:
        return data


def test_an_upload_without_a_live_token_is_refused_before_its_body_is_read(live_server):
    """FastAPI parses a multipart body before the login check: the token is checked from the headers first.

    The 401 comes before any body byte is sent (a server waiting for the body would answer nothing);
    the connection stays usable once the client has sent its body anyway, as clients do before they
    read an answer (closing on unread bytes would reset the connection and lose the 401)."""
    host, port = re.match(r"http://([^:/]+):(\d+)", live_server.url).groups()
    for authorization in (None, "Bearer 1.not-a-secret", "Basic abc"):
        head = (f"POST /v1/models/inputs/updates HTTP/1.1\r\nHost: {host}\r\nContent-Length: 500000\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\n"
                + (f"Authorization: {authorization}\r\n" if authorization else "") + "\r\n")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(head.encode("latin-1"))
            answer = _read_response(connection)
            assert answer.startswith(b"HTTP/1.1 401"), (authorization, answer[:80])
            assert b"bearer token" in answer and b"www-authenticate: bearer" in answer.lower()
            connection.sendall(b"\0" * 500_000)  # the body the client had announced, drained and discarded
            connection.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert _read_response(connection).startswith(b"HTTP/1.1 200"), authorization
    # Through an ordinary client, which sends the whole body first: a clean 401, no connection error.
    r = requests.post(f"{live_server.url}/v1/models/inputs/updates", headers=bearer("1.not-a-secret"), timeout=10,
                      files={"delta": ("d", b"\0" * (900 << 10))}, data={"metadata": "{}"})
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]


def test_users_refused_too_often_are_not_checked_again_and_refusals_are_audited(live_server, tiny_leg):
    token = new_user(live_server)
    statuses = {upload(live_server, token, "inputs", b"garbage").status_code for _ in range(30)}
    assert statuses == {422}  # 30 refusals per hour on this server
    r = upload(live_server, token, "inputs", encode_delta(noisy_delta(tiny_leg.state_dict)))
    assert r.status_code == 429 and "refused uploads" in r.json()["detail"]
    name = requests.get(f"{live_server.url}/v1/me", headers=bearer(token), timeout=10).json()["name"]
    audit = requests.get(f"{live_server.url}/v1/admin/audit", params={"limit": 1000},
                         headers=bearer(live_server.admin_token), timeout=10).json()
    refusals = [a for a in audit if a["actor"] == name and a["action"] == "update_refused"]
    assert len(refusals) == 30 and "zlib" in refusals[0]["detail"]["reason"]


def test_tokens_wrong_revoked_expired_and_scopes(live_server, tiny_leg):
    url = f"{live_server.url}/v1/me"
    token = new_user(live_server)
    assert requests.get(url, headers=bearer(token), timeout=10).json()["scope"] == "contributor"
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    for headers in ({}, bearer(tampered), bearer("dft_1_" + "x" * 43), {"Authorization": f"Basic {token}"},
                    {"Authorization": token}):
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert requests.get(url, params={"token": token}, timeout=10).status_code == 401  # header only
    assert requests.get(f"{live_server.url}/v1/admin/users", headers=bearer(token), timeout=10).status_code == 403
    token_id = int(token.split("_")[1])
    r = requests.delete(f"{live_server.url}/v1/admin/tokens/{token_id}", headers=bearer(live_server.admin_token),
                        timeout=10)
    assert r.status_code == 204
    assert requests.get(url, headers=bearer(token), timeout=10).status_code == 401
    blob = encode_delta(noisy_delta(tiny_leg.state_dict))
    assert upload(live_server, token, "inputs", blob).status_code == 401
    short = live_server.add_user(f"t{uuid.uuid4().hex[:6]}", expires_in_s=5.0)
    expires = time.monotonic() + 5.0  # at the latest: the token was made before add_user returned
    assert requests.get(url, headers=bearer(short), timeout=10).status_code == 200
    time.sleep(max(0.0, expires - time.monotonic()) + 0.2)
    assert requests.get(url, headers=bearer(short), timeout=10).status_code == 401


def test_admin_rollback_settings_staleness_rate_limit_and_audit(live_server, tiny_leg):
    admin = bearer(live_server.admin_token)
    base = f"{live_server.url}/v1/admin/models/client"
    client = client_for(live_server, new_user(live_server))
    pushed = client.push(encode_delta(noisy_delta(tiny_leg.state_dict, seed=5)), DeltaMetadata("client", "1", 2, {}))
    assert requests.post(f"{base}/merge", headers=admin, timeout=10).status_code == 202  # fewer than K
    assert client.wait_for_update(pushed["id"], timeout_s=90)["status"] == "merged"
    active = client.families()
    assert [f for f in active if f["name"] == "client"][0]["active_version"] == 2
    r = requests.post(f"{base}/activate", json={"version": 1}, headers=admin, timeout=10)
    assert r.status_code == 200 and r.json()["active_version"] == 1
    assert requests.post(f"{base}/activate", json={"version": 9}, headers=admin, timeout=10).status_code == 404
    assert [v["number"] for v in client.versions("client")] == [1, 2]  # rollback keeps every version
    assert [v["number"] for v in client.versions("client", page=1)] == [1, 2]  # read a page at a time
    listing = f"{live_server.url}/v1/models/client/versions"
    page = requests.get(listing, params={"limit": 1}, headers=admin, timeout=10).json()
    assert [v["number"] for v in page] == [2] and not page[0]["active"]  # the newest; pages back with before=
    assert [v["number"] for v in requests.get(listing, params={"limit": 1, "before": 2}, headers=admin,
                                              timeout=10).json()] == [1]
    for bad in ({"limit": 0}, {"limit": 1001}, {"before": 0}, {"before": 2 ** 40}):
        assert requests.get(listing, params=bad, headers=admin, timeout=10).status_code == 422, bad
    assert requests.post(f"{base}/activate", json={"version": 2}, headers=admin, timeout=10).status_code == 200
    r = requests.patch(f"{base}/settings", json={"max_staleness": 0, "buffer_size": 50}, headers=admin, timeout=10)
    assert r.status_code == 200 and r.json()["max_staleness"] == 0
    assert requests.patch(f"{base}/settings", json={"robust_rule": "max"}, headers=admin, timeout=10).status_code == 422
    # An explicit null is not "leave as is": stored, it would make every later merge of the family raise.
    for field in ("dice_tolerance", "label_tolerance", "buffer_size"):
        r = requests.patch(f"{base}/settings", json={field: None}, headers=admin, timeout=10)
        assert r.status_code == 422 and field in r.text, (field, r.status_code)
    assert requests.get(f"{base}/settings", headers=admin, timeout=10).json()["dice_tolerance"] is not None
    # The refusal echoes the input; a lone surrogate in it must still render (ASCII escapes), not fail with a 500.
    r = requests.post(f"{live_server.url}/v1/admin/users", headers={**admin, "Content-Type": "application/json"},
                      timeout=10, data='{"name": "\\ud800"}')
    assert r.status_code == 422 and "\\ud800" in r.text
    token = new_user(live_server)
    stale = upload(live_server, token, "client", encode_delta(noisy_delta(tiny_leg.state_dict)), parent_version="1")
    assert stale.status_code == 409 and "behind" in stale.json()["detail"]
    statuses = [upload(live_server, token, "client", encode_delta(noisy_delta(tiny_leg.state_dict, seed=100 + i)),
                       parent_version="2").status_code for i in range(9)]
    assert statuses == [202] * 8 + [429]  # 8 accepted uploads per hour per user on this server
    audit = requests.get(f"{live_server.url}/v1/admin/audit", params={"limit": 1000}, headers=admin, timeout=10).json()
    actions = {(a["action"], a["family"]) for a in audit}
    for expected in [("update_received", "client"), ("merge_requested", "client"), ("merge_published", "client"),
                     ("version_activated", "client"), ("settings_changed", "client"), ("user_created", None)]:
        assert expected in actions
    assert [a["id"] for a in audit] == sorted(a["id"] for a in audit)


def test_weights_download_etag_range_and_resume(live_server, tmp_path):
    token = new_user(live_server)
    info = requests.get(f"{live_server.url}/v1/models/fuzz/versions/1/package", headers=bearer(token),
                        timeout=10).json()
    weights_url = live_server.url + info["weights_url"]
    full = requests.get(weights_url, headers=bearer(token), timeout=10)
    etag = full.headers["etag"]
    assert etag == f'"{info["weights_sha256"]}"' and len(full.content) == info["weights_size"]
    part = requests.get(weights_url, headers={**bearer(token), "Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{info['weights_size']}"
    assert requests.get(weights_url, headers={**bearer(token), "If-None-Match": etag}, timeout=10).status_code == 304
    # A numbered version never changes; "active" moves with every merge or rollback, so no cache may keep it.
    assert "immutable" in full.headers["cache-control"]
    active = requests.get(weights_url.replace("/versions/1/", "/versions/active/"), headers=bearer(token), timeout=10)
    assert active.status_code == 200 and active.headers["cache-control"] == "no-cache"
    # resume: half the file is already on disk, the client asks for the rest
    partial = user_data_dir() / "downloads" / f"{info['weights_sha256']}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(full.content[: len(full.content) // 2])
    client = client_for(live_server, token)
    assert ModelPackage.load(client.pull("fuzz", "1", models_dir=tmp_path / "a")).manifest.weights_sha256 == \
        info["weights_sha256"]
    # a complete but corrupted partial file is detected by its sha256 and fetched again
    partial.write_bytes(bytes(len(full.content)))
    assert ModelPackage.load(client.pull("fuzz", "1", models_dir=tmp_path / "b")).manifest.version == "1"
    assert not partial.exists()


def test_tokens_never_reach_the_server_log(live_server):
    token = new_user(live_server)
    requests.get(f"{live_server.url}/v1/me", headers=bearer(token), timeout=10)
    requests.get(f"{live_server.url}/v1/me", params={"token": token}, timeout=10)  # misuse: still redacted
    deadline = time.monotonic() + 10
    while "/v1/me?token=dft_<redacted>" not in (log := live_server.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the access log line never appeared"
        time.sleep(0.1)  # uvicorn writes the access line after the response
    assert token.split("_", 2)[2] not in log and not re.search(r"dft_[0-9]+_[A-Za-z0-9_-]{43}", log)


def test_a_user_created_concurrently_is_a_conflict_not_a_server_error(tmp_path, monkeypatch):
    """On PostgreSQL two requests for one name can both pass the existence check; the unique
    constraint then refuses the second insert, which must read 409 as the checked case does."""
    from test_server_dashboard import _in_thread

    import dafne_server.routers.admin as admin_routes
    from dafne_server.app import create_app
    from dafne_server.auth import create_user
    from dafne_server.config import ServerSettings
    from dafne_server.db import User
    from dafne_server.runner import prepare

    settings = ServerSettings(data_dir=str(tmp_path / "data"))
    storage = prepare(settings)
    with storage.session.begin() as session:
        admin = create_user(session, "root", admin=True)
        session.add(User(name="twin"))  # the concurrent request's row
    storage.dispose()

    def check_passed_then_insert(session, name, *args):  # the other request's row lands after our check
        session.add(User(name=name))
        session.flush()

    monkeypatch.setattr(admin_routes, "create_user", check_passed_then_insert)
    with _in_thread(create_app(settings)) as url:
        r = requests.post(f"{url}/v1/admin/users", json={"name": "twin"}, headers=bearer(admin), timeout=30)
    assert r.status_code == 409 and "already exists" in r.json()["detail"], r.text

