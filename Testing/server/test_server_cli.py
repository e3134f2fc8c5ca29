"""`dafne-server init | add-user | revoke | gc` on a fresh data folder."""

from __future__ import annotations

import json
import os
import time

import pytest
import sqlalchemy as sa

from dafne_logic.inference.manifest import list_models
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


def test_standalone_worker_uses_the_merge_settings_its_server_stored(tmp_path, capsys):
    from dafne_server.cli import _settings, build_parser
    from dafne_server.config import SHARED_FILE, load_shared

    data = str(tmp_path / "server")
    validation = tmp_path / "cases"
    assert server_main(["init", "--data-dir", data, "--validation", str(validation), "--validation-cases", "3",
                        "--lease-ttl", "20"]) == 0
    worker_args = build_parser().parse_args(["worker", "--data-dir", data])
    settings = load_shared(_settings(worker_args))  # what `dafne-server worker` runs with
    assert (settings.validation, settings.validation_cases, settings.lease_ttl_s) == (str(validation), 3, 20.0)
    assert settings.validation_id.startswith(f"folder:{validation}:")
    # Edited or added cases are other cases: cached scores of the old ones must not be compared with them.
    before = settings.validation_id
    validation.mkdir()
    (validation / "a_image.nii.gz").write_bytes(b"x")
    assert load_shared(_settings(worker_args)).validation_id != before
    # a later init without flags keeps them; the worker has no flags of its own to disagree with
    assert server_main(["init", "--data-dir", data]) == 0
    assert load_shared(_settings(worker_args)).validation_cases == 3
    assert json.loads((tmp_path / "server" / SHARED_FILE).read_text())["lease_ttl_s"] == 20.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--data-dir", data, "--validation", "none"])
    (tmp_path / "server" / SHARED_FILE).write_text("{not json")
    assert server_main(["worker", "--data-dir", data]) == 2
    assert "settings.json does not hold the server's settings" in capsys.readouterr().err


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


@pytest.mark.parametrize("argv, message", [
    (["add-user", "bob", "--expires-days", "nan"], "finite number above 0"),  # was stored as NULL: a token that never expires
    (["add-user", "bob", "--expires-days", "-1"], "finite number above 0"),
    (["run", "--max-upload-mb", "inf"], "finite number above 0"),
    (["run", "--max-upload-mb", "1e308"], "at most 4096"),
    (["run", "--max-connections", "0"], "above 0"),
    (["run", "--uploads-per-hour", "-1"], "at least 0"),
    (["init", "--buffer-size", "1" + "0" * 400], "at most 1e+09"),  # no OverflowError from isfinite
    (["init", "--validation-shape", "0", "0", "0"], "above 0"),
    (["gc", "--database-url", "foo://x"], "not one SQLAlchemy can use"),
    (["gc", "--database-url", "not a url"], "not one SQLAlchemy can use"),
    (["init", "--validation-cases", "5", "--family", "x", "--package", "/nonexistent"], "nonexistent"),
    (["init", "--validation-cases", "5", "--family", "x"], "go together"),
    (["init", "--validation-cases", "5", "--family", "Bad Name", "--package", "."], "family names"),
])
def test_bad_numbers_and_database_urls_are_refused_with_exit_2(tmp_path, capsys, argv, message):
    data = tmp_path / "server"
    try:
        rc = server_main([argv[0], "--data-dir", str(data), *argv[1:]])
    except SystemExit as exit_:  # argparse's own refusal: usage line and the reason
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (data / "settings.json").exists()


def test_init_refuses_a_folder_holding_other_files_and_leaves_them_as_they_were(tmp_path, capsys):
    """`--data-dir ~` by mistake: the server makes everything in its folder owner-only."""
    home = tmp_path / "home"
    home.mkdir()
    script = home / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o755)
    assert server_main(["init", "--data-dir", str(home)]) == 2
    assert "no server data" in capsys.readouterr().err
    assert os.stat(script).st_mode & 0o777 == 0o755 and sorted(p.name for p in home.iterdir()) == ["run.sh"]
    # What a fresh disk or a file manager leaves in any folder is not "other files".
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    (volume / ".DS_Store").write_bytes(b"")
    assert server_main(["init", "--data-dir", str(volume)]) == 0

