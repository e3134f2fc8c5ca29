"""`dafne-server init | add-user | revoke | gc` on a fresh data folder."""

from __future__ import annotations

import json
import os
import time

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


def test_gc_removes_only_old_blobs_nothing_references(tmp_path, tiny_leg, capsys):
    data = str(tmp_path / "server")
    assert server_main(["init", "--data-dir", data, "--family", "leg", "--package", str(tiny_leg.save(tmp_path / "p"))]) == 0
    storage = Storage(ServerSettings(data_dir=data))
    try:
        orphan, young = storage.blobs.put(b"orphan"), storage.blobs.put(b"young orphan")
        past = time.time() - 3 * 3600
        os.utime(storage.blobs.path(orphan), (past, past))
        for blob in storage.blobs.root.glob("??/*"):  # the seed version's weights too: referenced, kept
            if blob.name != young:
                os.utime(blob, (past, past))
        capsys.readouterr()
        assert server_main(["gc", "--data-dir", data, "--older-than-hours", "2"]) == 0
        assert "1 unreferenced blob(s) removed" in capsys.readouterr().out
        assert not storage.blobs.exists(orphan) and storage.blobs.exists(young)
        assert len(list(storage.blobs.root.glob("??/*"))) == 2  # the seed weights and the young orphan
    finally:
        storage.dispose()
