"""The data folder: owner-only on POSIX (with the Windows path taken too), durable blob writes,
SQLite commits that survive a power cut."""

from __future__ import annotations

import os
import stat

import pytest

from dafne_logic.core.errors import DafneError
from dafne_server import private_files
from dafne_server.blobs import BlobStore
from dafne_server.config import ServerSettings
from dafne_server.runner import prepare


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_data_folder_database_and_blobs_are_owner_only(tmp_path, tiny_leg):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "blobs" / "ab").mkdir(parents=True)
    old_blob = data / "blobs" / "ab" / ("ab" + "0" * 62)  # left readable by an older version
    old_blob.write_bytes(b"x")
    old_blob.chmod(0o644)
    storage = prepare(ServerSettings(data_dir=str(data)))
    try:
        with storage.session.begin() as session:
            version = storage.add_family(session, "leg", tiny_leg, "test")
        blob = storage.blobs.path(version.weights_sha256)
        for folder in (data, data / "blobs", blob.parent, old_blob.parent):
            assert _mode(folder) == 0o700, folder
        for file in (data / "server.db", data / "server.db-wal", blob, old_blob):
            assert _mode(file) == 0o600, file
    finally:
        storage.dispose()


def test_blob_and_its_folders_are_fsynced_before_put_returns(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(private_files.os, "fsync", recording_fsync)
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"an acknowledged delta")
    assert store.get(digest) == b"an acknowledged delta"
    if os.path.exists("/proc/self/fd"):  # Linux: name what was synced
        shard = str(store.path(digest).parent)
        assert synced[0].startswith(shard + "/.")  # the temporary file, before its rename
        assert synced[1:] == [shard, str(store.root)]  # the new name, then the new shard's name
    else:
        assert len(synced) == 3


def test_windows_path_writes_without_posix_only_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(private_files, "POSIX", False)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a POSIX-only call on the Windows path")

    monkeypatch.setattr(private_files.os, "chmod", refuse)
    real_open = os.open
    monkeypatch.setattr(private_files.os, "open", lambda path, flags, *mode: refuse() if os.path.isdir(path)
                        else real_open(path, flags, *mode))  # Windows cannot open a folder to fsync it
    settings = ServerSettings(data_dir=str(tmp_path / "data"))
    storage = prepare(settings)
    try:
        digest = storage.blobs.put(b"delta")
        assert storage.blobs.get(digest) == b"delta"
    finally:
        storage.dispose()


def test_sqlite_commits_are_synchronous_full(tmp_path):
    storage = prepare(ServerSettings(data_dir=str(tmp_path / "data")))
    try:
        for engine in (storage.engine, storage.read_engine):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        storage.dispose()


@pytest.mark.parametrize("name", ["x%41", "a?b", "é x"])
def test_the_database_is_in_the_data_folder_whatever_its_name(tmp_path, name):
    """The SQLite URL was built from the path unescaped: "x%41" put the database in "xA", readable by all."""
    data = tmp_path / name
    storage = prepare(ServerSettings(data_dir=str(data)))
    storage.dispose()
    assert (data / "server.db").stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_tightening_skips_files_a_live_server_renames_meanwhile(tmp_path, monkeypatch):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ".tmp-upload").write_bytes(b"x")
    real_chmod = os.chmod

    def renamed_meanwhile(path, mode):
        if str(path).endswith(".tmp-upload"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        real_chmod(path, mode)

    monkeypatch.setattr(private_files, "POSIX", True)
    monkeypatch.setattr(private_files.os, "chmod", renamed_meanwhile)
    private_files.tighten_tree(tmp_path)  # no FileNotFoundError


def test_on_windows_a_durable_write_onto_a_file_held_a_moment_is_retried(tmp_path, monkeypatch):
    """settings.json, session.key and blobs: a virus scanner holding the target made uploads 503 and merges fail."""
    from dafne_logic.core import atomic

    target = tmp_path / "settings.json"
    target.write_bytes(b"old")
    refusals = []
    real_replace = os.replace

    def scanner_holds_it(source, destination):
        if len(refusals) < 2:
            refusals.append(destination)
            raise PermissionError(13, "The process cannot access the file", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(atomic, "WINDOWS", True)
    monkeypatch.setattr(atomic.time, "sleep", lambda s: None)
    monkeypatch.setattr(atomic.os, "replace", scanner_holds_it)
    private_files.write_durable(target, b"new")
    assert target.read_bytes() == b"new" and len(refusals) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "settings.json"]


def test_a_database_an_earlier_version_kept_elsewhere_is_asked_to_be_moved_not_replaced(tmp_path):
    """For a folder named 'x%41' earlier versions kept the database in 'xA': starting on a new, empty one
    there would lose every user and version (and collect every blob as an orphan)."""
    data = tmp_path / "x%41"
    data.mkdir()
    (data / "blobs").mkdir()
    (tmp_path / "xA").mkdir()
    (tmp_path / "xA" / "server.db").write_bytes(b"SQLite format 3\0")
    with pytest.raises(DafneError, match="kept at .*xA.server.db by an earlier version"):
        prepare(ServerSettings(data_dir=str(data)))
    from dafne_server.cli import main as server_main

    assert server_main(["gc", "--data-dir", str(data)]) == 2  # a daily gc must not make the new file either
    assert not (data / "server.db").exists()


def test_a_database_without_any_version_collects_no_blob(tmp_path):
    """An empty or wrong database (a typo in --database-url) must not take every blob for an orphan."""
    import time

    storage = prepare(ServerSettings(data_dir=str(tmp_path / "data")))
    try:
        digest = storage.blobs.put(b"weights of a version this database does not know")
        past = time.time() - 7200
        os.utime(storage.blobs.path(digest), (past, past))
        assert storage.collect_blobs() == 0 and storage.blobs.exists(digest)
    finally:
        storage.dispose()


def test_blobs_are_not_collected_against_another_database_url(tmp_path, tiny_leg):
    """A server started on a mistyped --database-url and then given families by `init` has versions, but
    not the real database's: its collection took the real versions' weights for orphans."""
    import time

    data = tmp_path / "data"
    real = prepare(ServerSettings(data_dir=str(data), database_url=f"sqlite:///{tmp_path / 'real.db'}"))
    try:
        with real.session.begin() as session:
            weights = real.add_family(session, "leg", tiny_leg, "test").weights_sha256
        assert real.collect_blobs() == 0  # records which database the blobs belong to
    finally:
        real.dispose()
    past = time.time() - 7200
    os.utime(BlobStore(data / "blobs").path(weights), (past, past))
    import copy

    from dafne_logic.inference.model_package import ModelPackage

    other = ModelPackage(copy.deepcopy(tiny_leg.manifest), {k: v + 1 for k, v in tiny_leg.state_dict.items()})
    wrong = prepare(ServerSettings(data_dir=str(data), database_url=f"sqlite:///{tmp_path / 'typo.db'}"))
    try:
        with wrong.session.begin() as session:
            wrong.add_family(session, "leg", other, "init on the wrong database")  # other weights: other blobs
        assert wrong.collect_blobs() == 0 and wrong.blobs.exists(weights)
    finally:
        wrong.dispose()
