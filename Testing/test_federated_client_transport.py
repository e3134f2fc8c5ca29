"""The federated client's transport without a server: where the token may go, and failures as one sentence."""

from __future__ import annotations

import json
import os

import pytest
import requests

from dafne_logic.core.client_config import ClientConfig, check_server_url
from dafne_logic.core.errors import DafneError
from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME
from dafne_logic.learning.federated_client import FederatedClient, SyncError


@pytest.mark.parametrize("url", ["http://localhost.evil.example", "http://localhost@evil.example",
                                 "http://127.0.0.1.nip.io", "http://dafne.example.org", "ftp://dafne.example.org",
                                 "https://user@dafne.example.org", "https://", "https://host:port"])
def test_the_token_never_goes_in_the_clear_or_to_a_host_hidden_behind_a_prefix(url):
    with pytest.raises(DafneError):
        check_server_url(url)


@pytest.mark.parametrize("url", ["https://dafne.example.org/", "http://localhost:8642", "http://127.0.0.1:8642",
                                 "http://[::1]:8642"])
def test_https_anywhere_and_plain_http_to_this_machine_pass(url):
    assert check_server_url(url) == url.rstrip("/")


class Recorder(requests.Session):
    """A session that records requests and answers with the given replies (or raises them)."""

    def __init__(self, *replies):
        super().__init__()
        self.replies, self.calls = list(replies), []

    def request(self, method, url, **kwargs):  # noqa: ANN001, ANN003 - requests' own signature
        self.calls.append((method, url, kwargs.get("headers", {})))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def _reply(status: int, body: bytes, content_type: str = "application/json") -> requests.Response:
    response = requests.Response()
    response.status_code, response._content = status, body
    response.headers["Content-Type"] = content_type
    return response


def _client(session, url="https://dafne.example.org") -> FederatedClient:
    return FederatedClient(ClientConfig(url, "secret-token", opt_in=True), session=session, backoff_s=0.0)


def test_a_hand_edited_config_pointing_plain_http_elsewhere_sends_nothing():
    session = Recorder()
    with pytest.raises(SyncError, match="https"):
        _client(session, "http://localhost.evil.example").me()
    assert session.calls == []


def test_a_reply_cut_in_the_middle_is_retried_and_a_proxy_page_is_one_sentence():
    session = Recorder(requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
                       _reply(200, b'{"name": "site-a", "scope": "contributor", "updates": 0}'))
    assert _client(session).me()["name"] == "site-a" and len(session.calls) == 2
    with pytest.raises(SyncError, match="not JSON"):
        _client(Recorder(_reply(200, b"<html>Log in to the guest Wi-Fi</html>", "text/html"))).me()
    with pytest.raises(SyncError, match="could not be made"):
        _client(Recorder(requests.exceptions.InvalidHeader("Invalid leading whitespace"))).me()


def test_a_malformed_delta_description_is_one_sentence_naming_the_file(tmp_path):
    (tmp_path / DELTA_NAME).write_bytes(b"x")
    (tmp_path / DELTA_METADATA_NAME).write_text(json.dumps({"parent_version": "3"}))
    session = Recorder()
    with pytest.raises(SyncError, match=DELTA_METADATA_NAME):
        _client(session).push_folder(tmp_path)
    assert session.calls == []


@pytest.mark.parametrize("version, manifest, sha", [("../../x", {"name": "leg", "version": "../../x"}, "0" * 64),
                                                     (True, {}, "0" * 64), (3, {"name": "thigh", "version": "3"}, "0" * 64),
                                                     (3, {"name": "leg", "version": "4"}, "0" * 64),
                                                     (3, {"name": "leg", "version": "3"}, "../../../x")])
def test_a_pulled_package_is_named_by_a_number_the_server_cannot_turn_into_a_path(tmp_path, version, manifest, sha):
    reply = _reply(200, json.dumps({"version": version, "manifest": manifest, "weights_sha256": sha,
                                    "weights_url": "/x", "weights_size": 1}).encode())
    with pytest.raises(SyncError, match="not a valid package"):
        _client(Recorder(reply)).pull("leg", "active", models_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists() and not (tmp_path / "x").exists()


def test_a_token_saved_by_a_windows_editor_works_or_is_one_sentence(tmp_path, capsys):
    """Notepad's UTF-8 starts with a byte-order mark, PowerShell's `>` writes UTF-16: the first is read
    as the token, the second refused in one sentence; a hand-edited token that no header can hold
    never reaches requests (which would raise UnicodeEncodeError from deep inside)."""
    from dafne_logic.cli import main as cli_main
    from dafne_logic.core.client_config import load_config

    with_mark = tmp_path / "token.txt"
    with_mark.write_bytes("\ufeffdft_1_secret\r\n".encode())
    assert cli_main(["sync", "setup", "--token-file", str(with_mark)]) == 0
    assert load_config().token == "dft_1_secret"

    utf16 = tmp_path / "token16.txt"
    utf16.write_bytes("dft_1_other\r\n".encode("utf-16"))
    assert cli_main(["sync", "setup", "--token-file", str(utf16)]) == 2
    assert "UTF-8" in capsys.readouterr().err and load_config().token == "dft_1_secret"

    session = Recorder()
    client = FederatedClient(ClientConfig("https://dafne.example.org", "dft_1_s\u00e9cret", opt_in=True),
                             session=session, backoff_s=0.0)
    with pytest.raises(SyncError, match="copy it again"):
        client.me()
    assert session.calls == []


@pytest.mark.parametrize("field, value, message", [
    ("opt_in", "false", "opt_in must be true or false"),  # a non-empty string is true to Python: sharing would be on
    ("opt_in", 1, "opt_in must be true or false"),
    ("timeout_s", "30", "timeout_s"),
    ("server_url", 42, "server_url must be text"),
    ("token", ["x"], "token must be text"),
    ("verify_tls", 0, "verify_tls"),
])
def test_a_hand_edited_sync_file_of_the_wrong_types_is_one_sentence_and_sends_nothing(field, value, message):
    from dafne_logic.core.client_config import config_path, load_config, save_config

    save_config(ClientConfig("https://dafne.example.org", "secret-token", opt_in=False))
    data = json.loads(config_path().read_text(encoding="utf-8"))
    config_path().write_text(json.dumps({**data, field: value}), encoding="utf-8")
    with pytest.raises(DafneError, match=message):
        load_config()


def test_a_sync_file_saved_by_notepad_is_read_and_a_broken_one_is_mended_by_setup(capsys):
    from dafne_logic.cli import main as cli_main
    from dafne_logic.core.client_config import config_path, load_config, save_config

    save_config(ClientConfig("https://dafne.example.org", "secret-token", opt_in=True))
    text = config_path().read_text(encoding="utf-8")
    config_path().write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Notepad's UTF-8, with a byte-order mark
    assert load_config().opt_in is True
    config_path().write_bytes(text.encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(DafneError, match="UTF-8"):
        load_config()
    assert cli_main(["sync", "setup", "--opt-out"]) == 0  # setup mends it rather than refusing to start
    assert "kept what was valid" in capsys.readouterr().err
    mended = load_config()  # the token, issued once, is not lost with the encoding
    assert (mended.server_url, mended.token, mended.opt_in) == ("https://dafne.example.org", "secret-token", False)
    config_path().write_text(json.dumps({**json.loads(text), "opt_in": "false", "timeout_s": "30"}), encoding="utf-8")
    assert cli_main(["sync", "setup", "--opt-in"]) == 0
    assert "dropped: opt_in, timeout_s" in capsys.readouterr().err and load_config().token == "secret-token"


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_setup_leaves_a_sync_file_readable_by_others_to_its_owner(capsys):
    from dafne_logic.cli import main as cli_main
    from dafne_logic.core.client_config import config_path, load_config, save_config

    save_config(ClientConfig("https://dafne.example.org", "secret-token", opt_in=True))
    config_path().chmod(0o644)
    assert cli_main(["sync", "setup", "--opt-out"]) == 2
    assert "chmod 600" in capsys.readouterr().err
    config_path().chmod(0o600)
    assert load_config().token == "secret-token"  # nothing was rewritten


@pytest.mark.parametrize("edit", [{"parent_version": 3}, {"n_slices": "four"}, {"dice_per_label": []},
                                  {"dice_per_label": {"right soleus": "high"}}, {"family": None}])
def test_a_hand_edited_delta_description_of_the_wrong_types_is_one_sentence(tmp_path, edit):
    good = {"family": "leg", "parent_version": "3", "n_slices": 4, "dice_per_label": {"right soleus": 0.9, "left soleus": None},
            "client_version": "1", "parent_sha256": ""}
    (tmp_path / DELTA_NAME).write_bytes(b"x")
    (tmp_path / DELTA_METADATA_NAME).write_text(json.dumps({**good, **edit}))
    session = Recorder()
    with pytest.raises(SyncError, match="not a valid delta description"):
        _client(session).push_folder(tmp_path)
    assert session.calls == []


def test_a_delta_description_with_an_absent_label_reads_as_nan():
    import math

    from dafne_logic.learning.delta import DeltaMetadata

    metadata = DeltaMetadata.from_json({"family": "leg", "parent_version": "3", "n_slices": 4,
                                        "dice_per_label": {"a": None, "b": float("nan"), "c": 1}})
    assert math.isnan(metadata.dice_per_label["a"]) and math.isnan(metadata.dice_per_label["b"])
    assert metadata.dice_per_label["c"] == 1.0


@pytest.mark.parametrize("size", [None, "12", -1, True])
def test_a_package_description_without_a_usable_size_is_one_sentence(tmp_path, size):
    info = {"version": 3, "manifest": {"name": "leg", "version": "3"}, "weights_sha256": "0" * 64, "weights_url": "/x"}
    if size is not None:
        info["weights_size"] = size
    with pytest.raises(SyncError, match="not a valid package"):
        _client(Recorder(_reply(200, json.dumps(info).encode()))).pull("leg", "active", models_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("call, body", [
    (lambda client: client.me(), {"name": "site-a", "updates": 0}),  # no scope
    (lambda client: client.families(), {"name": "leg"}),  # an object, not a list
    (lambda client: client.families(), [{"name": "leg", "active_version": "3", "buffered_updates": 0}]),
    (lambda client: client.update_status("u1"), {"id": "u1", "status": "merged"}),
    (lambda client: client.versions("leg"), [{"numbr": 3}]),
])
def test_a_reply_of_another_shape_is_one_sentence_not_a_key_error(call, body):
    with pytest.raises(SyncError, match="another kind or version"):
        call(_client(Recorder(_reply(200, json.dumps(body).encode()))))


def test_a_refusal_whose_detail_is_a_list_of_texts_is_shown_as_it_is():
    reply = _reply(409, json.dumps({"detail": ["parent version 2 is not active"]}).encode())
    with pytest.raises(SyncError, match="parent version 2 is not active"):
        _client(Recorder(reply)).me()


def test_salvage_reads_an_ansi_file_and_refuses_an_unreadable_one(tmp_path, monkeypatch):
    from dafne_logic.core.client_config import salvage_config

    path = tmp_path / "sync.json"
    path.write_bytes(json.dumps({"server_url": "https://dafne.example.org", "token": "t0ken", "opt_in": True,
                                 "verify_tls": "C:\\Users\\José\\ca.pem", "timeout_s": "30"},
                                ensure_ascii=False).encode("cp1252"))  # older Notepad's "ANSI"
    config, dropped = salvage_config(path)
    assert (config.token, config.verify_tls, dropped) == ("t0ken", "C:\\Users\\José\\ca.pem", ["timeout_s"])

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)  # owned by root after a sudo
    with pytest.raises(DafneError, match="cannot read"):
        salvage_config(path)
