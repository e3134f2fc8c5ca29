"""`dafne-server init | add-user | revoke` on a fresh data folder."""

from __future__ import annotations

import json

import sqlalchemy as sa

from dafne_logic.inference.model_package import list_models
from dafne_server.auth import authenticate
from dafne_server.cli import main as server_main
from dafne_server.config import ServerSettings
from dafne_server.db import Family
from dafne_server.storage import Storage


def test_init_add_user_and_revoke(tmp_path, tiny_leg, capsys):
    data = str(tmp_path / "server")
    package = tiny_leg.save(tmp_path / "pkg")
    assert server_main(["init", "--data-dir", data]) == 0  # bundled models, whatever exists now
    bundled = {e.name for e in list_models(include_user=False)}
    assert server_main(["init", "--data-dir", data, "--family", "calf-test", "--package", str(package)]) == 0
    assert server_main(["init", "--data-dir", data, "--family", "calf-test", "--package", str(package)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert server_main(["add-user", "--data-dir", data, "alice", "--admin"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["user"] == "alice" and issued["token"].startswith("dft_")
    assert server_main(["add-user", "--data-dir", data, "alice"]) == 2
    storage = Storage(ServerSettings(data_dir=data))
    try:
        with storage.session() as session:
            assert set(session.scalars(sa.select(Family.name))) == bundled | {"calf-test"}
            assert authenticate(session, f"Bearer {issued['token']}").scope == "admin"
        token_id = issued["token"].split("_")[1]
        assert server_main(["revoke", "--data-dir", data, token_id]) == 0
        assert server_main(["revoke", "--data-dir", data, token_id]) == 2
        with storage.session() as session:
            assert authenticate(session, f"Bearer {issued['token']}") is None
    finally:
        storage.dispose()
