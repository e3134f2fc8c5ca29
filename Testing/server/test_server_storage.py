"""Storage, migrations, tokens and the merge lease on real SQLite and PostgreSQL (no HTTP)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dafne_server.auth import authenticate, create_user, issue_token, revoke_token
from dafne_server.blobs import BlobStore
from dafne_server.config import ServerSettings
from dafne_server.db import AuditEntry, Base, Family, MergeLease, User, Version
from dafne_server.runner import prepare
from dafne_server.worker import LeaseLost, claim_lease, release_lease, renew_lease


@pytest.fixture
def storage(tmp_path, database_url, tiny_leg):
    st = prepare(ServerSettings(data_dir=str(tmp_path / "data"), database_url=database_url, lease_ttl_s=1.5))
    with st.session.begin() as session:
        st.add_family(session, "leg", tiny_leg, "test")
    yield st
    st.dispose()


def test_migrations_match_the_models_and_are_idempotent(storage):
    storage.migrate()  # second run: nothing to do
    with storage.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_seed_version_is_stored_content_addressed_and_loads(storage, tiny_leg):
    with storage.session() as session:
        family = session.get(Family, "leg")
        version = session.scalar(sa.select(Version).where(Version.family == "leg"))
    assert family.active_version == 1 and version.number == 1 and version.source == "seed"
    assert storage.blobs.path(version.weights_sha256).is_file()
    package = storage.load_package(version)
    assert package.manifest.name == "leg" and package.manifest.version == "1"
    for name, tensor in tiny_leg.state_dict.items():
        assert (package.state_dict[name] == tensor.float()).all()  # stored as float32: exact


def test_duplicate_family_is_refused(storage, tiny_leg):
    with pytest.raises(ValueError, match="already exists"), storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
    with pytest.raises(ValueError, match="family names"), storage.session.begin() as session:
        storage.add_family(session, "Bad Name", tiny_leg, "test")


def test_audit_log_is_append_only(storage):
    with storage.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) >= 1
    for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), storage.engine.begin() as conn:
            conn.exec_driver_sql(statement)


def test_tokens_hashed_scoped_revocable_and_expiring(storage):
    with storage.session.begin() as session:
        admin_token = create_user(session, "alice", admin=True)
        contributor_token = create_user(session, "bob")
        short_token = issue_token(session, session.scalar(sa.select(User).where(User.name == "bob")),
                                  "contributor", expires_in_s=0.2)
        with pytest.raises(ValueError, match="not an administrator"):
            issue_token(session, session.scalar(sa.select(User).where(User.name == "bob")), "admin")
    with storage.engine.connect() as conn:  # only digests are stored
        stored = [row[0] for row in conn.exec_driver_sql("SELECT secret_sha256 FROM tokens")]
    assert all(admin_token.split("_", 2)[2] not in s for s in stored)  # the secret may itself hold "_"
    with storage.session() as session:
        assert authenticate(session, f"Bearer {admin_token}").scope == "admin"
        bob = authenticate(session, f"Bearer {contributor_token}")
        assert bob.name == "bob" and bob.scope == "contributor"
        wrong = contributor_token[:-4] + ("aaaa" if not contributor_token.endswith("aaaa") else "bbbb")
        for header in (None, contributor_token, f"Basic {contributor_token}", f"Bearer {wrong}", "Bearer dft_999_x"):
            assert authenticate(session, header) is None
    time.sleep(0.3)
    with storage.session.begin() as session:
        assert authenticate(session, f"Bearer {short_token}") is None  # expired
        assert revoke_token(session, bob.token_id, "test")
        assert not revoke_token(session, bob.token_id, "test")
    with storage.session() as session:
        assert authenticate(session, f"Bearer {contributor_token}") is None


def test_merge_lease_is_exclusive_expires_and_fences(storage):
    assert claim_lease(storage, "leg", "worker-a")
    assert not claim_lease(storage, "leg", "worker-b")  # held
    time.sleep(1.6)  # ttl 1.5 s: a dead holder's lease expires
    assert claim_lease(storage, "leg", "worker-b")
    with pytest.raises(LeaseLost), storage.engine.begin() as conn:
        renew_lease(conn, storage, "leg", "worker-a")  # the old holder can no longer publish
    release_lease(storage, "leg", "worker-a")  # not the holder: no effect
    assert not claim_lease(storage, "leg", "worker-a")
    release_lease(storage, "leg", "worker-b")
    assert claim_lease(storage, "leg", "worker-a")


def test_blob_store_is_content_addressed_and_atomic(tmp_path):
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"abc")
    assert blobs.put(b"abc") == digest and blobs.get(digest) == b"abc"
    assert blobs.path(digest).parent.name == digest[:2]
    stale = blobs.path(digest).parent / ".interrupted-write"
    stale.write_bytes(b"partial")
    assert blobs.sweep_temporaries(older_than_s=-1) == 1 and not stale.exists()
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_concurrent_lease_claims_have_exactly_one_winner(storage):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: claim_lease(storage, "leg", f"worker-{i}"), range(8)))
    assert won.count(True) == 1


def test_seed_keeps_the_package_version_number(storage, tiny_leg):
    from dafne_logic.inference.manifest import Manifest
    from dafne_logic.inference.model_package import ModelPackage

    manifest = Manifest.from_json({**tiny_leg.manifest.to_json(), "version": "0"})
    with storage.session.begin() as session:
        assert storage.add_family(session, "bundled-like", ModelPackage(manifest, tiny_leg.state_dict), "t").number == 0
        assert session.get(Family, "bundled-like").active_version == 0
    manifest.version = "2.local-abcd1234"  # not a server version: numbering starts at 1
    with storage.session.begin() as session:
        assert storage.add_family(session, "local-like", ModelPackage(manifest, tiny_leg.state_dict), "t").number == 1


def test_a_version_seeded_from_a_package_file_knows_that_file_s_weights(storage, tiny_leg, tmp_path):
    """Sites name their parent's weights by sha256: the server's float32 copy differs from the
    fp16 package file it was seeded from, so both are known; other weights are not."""
    from dafne_logic.inference.model_package import ModelPackage
    from dafne_server.storage import known_weights

    tiny_leg.save(tmp_path / "bundled-like")
    package = ModelPackage.load(tmp_path / "bundled-like")
    with storage.session.begin() as session:
        version = storage.add_family(session, "seeded", package, "t")
        known = known_weights(version)
    assert package.manifest.weights_sha256 != version.weights_sha256  # re-encoded as float32
    assert known == {version.weights_sha256, package.manifest.weights_sha256}
    assert "0" * 64 not in known


def test_blobs_nothing_references_are_collected_once_old_enough(storage):
    with storage.read() as session:
        seed_weights = session.scalar(sa.select(Version.weights_sha256))
    orphan = storage.blobs.put(b"an upload whose row was never committed")
    assert storage.collect_blobs() == 0 and storage.blobs.exists(orphan)  # young: its row may be on the way
    past = time.time() - 7200
    for sha in (orphan, seed_weights):
        os.utime(storage.blobs.path(sha), (past, past))
    assert storage.collect_blobs() == 1
    assert not storage.blobs.exists(orphan) and storage.blobs.exists(seed_weights)


def test_deltas_of_updates_finished_long_ago_are_collected_their_rows_kept(storage):
    """Every update's delta used to count as referenced for ever: a site at the upload limits could fill
    the disk with deltas nothing reads again, even rejected ones."""
    from dafne_server.db import UpdateRow, now

    day = 86400.0
    fates = {"buffered long ago": ("buffered", 90 * day), "merged long ago": ("merged", 31 * day),
             "rejected long ago": ("rejected", 40 * day), "rejected lately": ("rejected", 2 * day)}
    sha = {name: storage.blobs.put(name.encode()) for name in fates}
    with storage.session.begin() as session:
        create_user(session, "site")
        user_id = session.scalar(sa.select(User.id).where(User.name == "site"))
        for name, (status, age) in fates.items():
            session.add(UpdateRow(id=os.urandom(16).hex(), family="leg", user_id=user_id, idempotency_key=name,
                                  parent_version=1, n_slices=1, blob_sha256=sha[name], blob_size=len(name), norm=1.0,
                                  status=status, created_at=now() - age - day, updated_at=now() - age))
    past = time.time() - 7200
    for digest in sha.values():
        os.utime(storage.blobs.path(digest), (past, past))
    assert storage.collect_blobs() == 0  # a start keeps every update's delta
    assert storage.collect_blobs(update_delta_days=30) == 2  # gc's default
    assert {name for name, digest in sha.items() if storage.blobs.exists(digest)} == {"buffered long ago",
                                                                                      "rejected lately"}
    assert storage.collect_blobs(update_delta_days=1) == 1 and storage.blobs.exists(sha["buffered long ago"])
    with storage.read() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(UpdateRow)) == 4  # who sent what stays


def test_a_blob_stored_again_is_young_again_so_gc_keeps_it(tmp_path):
    """A retried upload may reuse a blob orphaned long ago: gc's age grace must cover it until its row commits."""
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"delta")
    long_ago = time.time() - 7200
    os.utime(store.path(digest), (long_ago, long_ago))
    assert store.put(b"delta") == digest
    assert store.remove_unreferenced(set(), older_than_s=3600) == 0 and store.path(digest).is_file()
    assert store.remove_unreferenced(set(), older_than_s=0) == 1


def test_a_blob_removed_by_gc_while_stored_again_is_written_again(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"delta")

    def gc_was_faster(path, *args):
        os.unlink(path)  # gc unlinks between the existence check and the touch
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(os, "utime", gc_was_faster)
    assert store.put(b"delta") == digest and store.get(digest) == b"delta"


def test_a_blob_stored_again_while_gc_looks_at_it_is_kept(tmp_path, monkeypatch):
    """gc reads an orphan's age, then an upload of the same bytes refreshes it before gc removes it:
    the upload's row would name a deleted blob, so gc must notice and keep it."""
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"delta")
    long_ago = time.time() - 7200
    os.utime(store.path(digest), (long_ago, long_ago))
    real_stat = Path.stat
    looked = []

    def upload_lands_right_after_gc_looked(self, *args, **kwargs):
        result = real_stat(self, *args, **kwargs)
        if self.name == digest and not looked:
            looked.append(self)
            assert store.put(b"delta") == digest  # the retried upload: only touches the existing file
        return result

    monkeypatch.setattr(Path, "stat", upload_lands_right_after_gc_looked)
    assert store.remove_unreferenced(set(), older_than_s=3600) == 0
    assert looked and store.get(digest) == b"delta"
    assert not list(store.path(digest).parent.glob(".*"))  # nothing left aside


def test_version_lists_page_from_the_newest_and_ancestry_follows_parents(storage, tiny_leg):
    """A family merging for months has thousands of versions: lists page (newest first, oldest first
    within a page) and the line of ancestors is read in one query, whatever the history's shape."""
    from dafne_server import crud

    with storage.session.begin() as session:
        family = session.get(Family, "leg")
        base = storage.load_package(session.scalar(sa.select(Version))).manifest
        stored = storage.store_weights(tiny_leg.state_dict)  # one blob for all: the weights do not matter here
        for parent in (1, 2, 3, 2):  # versions 2, 3, 4 in a line, then 5 branching from 2 (after a rollback)
            storage.new_version(session, family, base, tiny_leg.state_dict, parent, "test", {}, {}, stored=stored)
    with storage.read() as session:
        assert [v.number for v in crud.versions(session, "leg")] == [1, 2, 3, 4, 5]
        assert [v.number for v in crud.versions(session, "leg", limit=2)] == [4, 5]
        assert [v.number for v in crud.versions(session, "leg", limit=2, before=4)] == [2, 3]
        assert [v.number for v in crud.versions(session, "leg", limit=2, before=2)] == [1]
        newest = {v.number: v for v in session.scalars(sa.select(Version))}
        assert crud.ancestry(session, newest[5], 10) == {5: 0, 2: 1, 1: 2}
        assert crud.ancestry(session, newest[4], 10) == {4: 0, 3: 1, 2: 2, 1: 3}
        assert crud.ancestry(session, newest[4], 1) == {4: 0, 3: 1}


def test_gc_survives_another_process_taking_the_blob_it_set_aside(tmp_path, monkeypatch):
    """The API's and a worker's collections (and sweeps) run at once on one data folder: one that
    finds its set-aside copy gone must move on, not stop the server from starting."""
    import dafne_server.blobs as blobs_module

    store = BlobStore(tmp_path / "blobs")
    digest = store.put(b"orphan")
    long_ago = time.time() - 7200
    os.utime(store.path(digest), (long_ago, long_ago))
    real_replace = os.replace

    def another_sweep_right_after(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".gc"):
            assert f".{os.getpid()}." in Path(dst).name  # this process's own name for it
            os.unlink(dst)

    monkeypatch.setattr(blobs_module.os, "replace", another_sweep_right_after)
    assert store.remove_unreferenced(set(), older_than_s=3600) == 0
    assert not store.exists(digest) and not list(store.path(digest).parent.iterdir())


def test_a_worker_whose_clock_runs_ahead_does_not_take_a_live_lease(storage, monkeypatch):
    """Workers on several hosts share the database, not a clock: leases are written and compared by the
    database's time, so a host ten minutes ahead cannot take over a lease its holder keeps renewing."""
    import dafne_server.worker as worker

    assert claim_lease(storage, "leg", "worker-a")
    monkeypatch.setattr(worker, "now", lambda: time.time() + 600.0)  # the other host's clock
    assert not claim_lease(storage, "leg", "worker-b")
    with storage.engine.begin() as conn:
        renew_lease(conn, storage, "leg", "worker-a")
        expires = conn.scalar(sa.select(MergeLease.expires_at).where(MergeLease.family == "leg"))
    assert abs(expires - (time.time() + storage.settings.lease_ttl_s)) < 5.0  # by the database's clock


def test_on_windows_a_blob_or_temporary_file_held_open_does_not_stop_the_server_starting(tmp_path, monkeypatch):
    """Windows refuses to rename or remove a file another program holds (a virus scanner, a download
    being served): prepare() collects at every start, and must leave such a file for the next one."""
    import dafne_server.blobs as blobs_module

    store = BlobStore(tmp_path / "blobs")
    held, free = store.put(b"held orphan"), store.put(b"free orphan")
    leftover = store.path(held).parent / ".interrupted-upload"
    leftover.write_bytes(b"x")
    long_ago = time.time() - 7200
    for path in (store.path(held), store.path(free), leftover):
        os.utime(path, (long_ago, long_ago))
    real_replace, real_unlink = os.replace, Path.unlink

    def in_use(src, dst):
        if Path(src).name == held:
            raise PermissionError(13, "The process cannot access the file", str(src))
        real_replace(src, dst)

    def unlink_in_use(self, missing_ok=False):
        if self.name == ".interrupted-upload":
            raise PermissionError(13, "The process cannot access the file", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(blobs_module.os, "replace", in_use)
    monkeypatch.setattr(Path, "unlink", unlink_in_use)
    assert store.remove_unreferenced(set(), older_than_s=3600) == 1  # the free one
    assert store.sweep_temporaries() == 0
    assert store.path(held).is_file() and not store.path(free).exists() and leftover.is_file()
