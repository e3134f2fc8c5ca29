"""The opt-in sync client: nothing sent before opt-in, owner-only config, retries, the CLI."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from dafne_logic.cli import main as cli_main
from dafne_logic.core.client_config import ClientConfig, config_path, load_config, save_config
from dafne_logic.core.errors import DafneError
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.learning.delta import DeltaMetadata
from dafne_logic.learning.federated_client import FederatedClient, SyncDisabled, SyncError


class ScriptedServer:
    """A real HTTP server on loopback answering with a script of (status, JSON) and counting requests."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script = list(script)
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, body = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_nothing_is_sent_without_opt_in(scripted, tmp_path):
    server = scripted([(200, {})])
    client = FederatedClient(ClientConfig(server.url, "dft_1_" + "a" * 43, opt_in=False))
    for call in (client.me, client.families, lambda: client.pull("leg", models_dir=tmp_path),
                 lambda: client.push(b"delta", DeltaMetadata("leg", "1", 1, {}))):
        with pytest.raises(SyncDisabled, match="opt in"):
            call()
    assert server.requests == []
    # the default configuration (no file yet) is opted out too
    assert load_config() == ClientConfig() and not ClientConfig().opt_in


def test_config_file_is_owner_only_and_hides_the_token(tmp_path):
    config = ClientConfig("https://dafne.example.org", "dft_3_" + "s" * 43, opt_in=True)
    path = save_config(config)
    assert path == config_path() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config() == config
    assert "sss" not in repr(config)
    os.chmod(path, 0o644)
    with pytest.raises(DafneError, match="readable by other users"):
        load_config()


def test_retries_with_backoff_then_succeeds_and_4xx_is_not_retried(scripted):
    flaky = scripted([(503, {}), (502, {}), (200, {"name": "site", "scope": "contributor", "updates": 0})])
    client = FederatedClient(ClientConfig(flaky.url, "dft_1_" + "a" * 43, opt_in=True), backoff_s=0.01)
    assert client.me()["name"] == "site"
    assert len(flaky.requests) == 3
    assert flaky.requests[0][2]["Authorization"] == "Bearer dft_1_" + "a" * 43
    refusing = scripted([(422, {"detail": "delta tensor w contains NaN or Inf"})])
    client = FederatedClient(ClientConfig(refusing.url, "dft_1_" + "a" * 43, opt_in=True), backoff_s=0.01)
    with pytest.raises(SyncError, match="NaN"):
        client.push(b"x", DeltaMetadata("leg", "1", 1, {}))
    assert len(refusing.requests) == 1


def test_unreachable_server_is_one_clear_error():
    client = FederatedClient(ClientConfig("http://127.0.0.1:9", "dft_1_" + "a" * 43, opt_in=True, timeout_s=1),
                             retries=1, backoff_s=0.01)
    with pytest.raises(SyncError, match="cannot reach"):
        client.me()


def test_push_refuses_local_parents_and_sends_no_nan(scripted):
    server = scripted([(202, {"id": "a" * 32, "status": "buffered", "duplicate": False})])
    client = FederatedClient(ClientConfig(server.url, "dft_1_" + "a" * 43, opt_in=True))
    with pytest.raises(SyncError, match="not a server version"):
        client.push(b"x", DeltaMetadata("leg", "3.local-abcd1234", 1, {}))
    assert server.requests == []
    client.push(b"x", DeltaMetadata("leg", "3", 2, {"right soleus": 0.9, "left soleus": float("nan")}))
    client.push(b"x", DeltaMetadata("leg", "3", 2, {"right soleus": 0.9, "left soleus": float("nan")}))
    assert len(server.requests) == 2 and server.requests[0][1] == "/v1/models/leg/updates"


def test_sync_cli_setup_status_and_pull(sqlite_server, capsys, tmp_path, monkeypatch):
    assert cli_main(["sync", "status"]) == 0
    assert "OFF" in capsys.readouterr().out
    assert cli_main(["sync", "setup", "--server", sqlite_server.url, "--token", "wrong"]) == 0
    # The token from standard input (--token-file -): kept out of the shell's history and the process list.
    monkeypatch.setattr("sys.stdin", io.StringIO(sqlite_server.admin_token + "\n"))
    assert cli_main(["sync", "setup", "--token-file", "-"]) == 0
    assert load_config().token == sqlite_server.admin_token
    assert not load_config().opt_in  # setting a server is not opting in
    assert cli_main(["sync", "pull", "client"]) == 2
    assert "opt in" in capsys.readouterr().err
    assert cli_main(["sync", "setup", "--opt-in"]) == 0
    assert cli_main(["sync", "status"]) == 0
    out = capsys.readouterr().out
    assert "signed in as admin" in out and "client" in out
    assert cli_main(["sync", "pull", "client", "--version", "1"]) == 0
    assert "client-v1" in capsys.readouterr().out
    assert cli_main(["sync", "setup", "--server", "http://example.org"]) == 2  # plain http only for localhost


def test_sync_push_sends_a_finetune_output_folder(sqlite_server, tiny_leg, tmp_path, capsys):
    import torch

    from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME, encode_delta, make_delta

    child = {k: v + 1e-3 * torch.randn_like(v) for k, v in tiny_leg.state_dict.items()}
    folder = tmp_path / "finetuned"
    folder.mkdir()
    (folder / DELTA_NAME).write_bytes(encode_delta(make_delta(tiny_leg.state_dict, child)))
    metadata = DeltaMetadata("inputs", "1", 6, {"right soleus": 0.7})
    (folder / DELTA_METADATA_NAME).write_text(json.dumps(metadata.to_json()))
    save_config(ClientConfig(sqlite_server.url, sqlite_server.add_user("pusher"), opt_in=True))
    assert cli_main(["sync", "push", str(folder)]) == 0
    first = capsys.readouterr().out
    assert "buffered" in first and "already uploaded" not in first
    assert cli_main(["sync", "push", str(folder)]) == 0  # the same folder again: accepted once
    assert "already uploaded" in capsys.readouterr().out
    assert cli_main(["sync", "push", str(tmp_path)]) == 2
    assert "delta.json" in capsys.readouterr().err


def test_tls_is_verified(tmp_path, tiny_leg):
    import shutil
    import subprocess

    from dafne_server.testing import LocalServer

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = LocalServer(tmp_path / "data", validation="none", families={"leg": tiny_leg}, tls=(str(cert), str(key)))
    server.start()
    try:
        assert server.url.startswith("https://")
        untrusted = FederatedClient(ClientConfig(server.url, server.admin_token, opt_in=True))
        with pytest.raises(SyncError, match="certificate .* is not trusted"):  # self-signed: refused by default
            untrusted.me()
        trusted = FederatedClient(ClientConfig(server.url, server.admin_token, opt_in=True, verify_tls=str(cert)))
        assert trusted.me()["name"] == "admin"
        hsts = requests.get(f"{server.url}/login", verify=str(cert), timeout=30).headers
        assert hsts["Strict-Transport-Security"].startswith("max-age=")  # only under TLS
        assert ModelPackage.load(trusted.pull("leg", models_dir=tmp_path / "models")).manifest.version == "1"
    finally:
        server.stop()
