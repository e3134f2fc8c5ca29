"""The merge worker against a real database, with stub scorers (the gate's inputs) instead of inference."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from dafne_logic.inference.manifest import Manifest
from dafne_logic.learning.delta import encode_delta, make_delta, weights_norm
from dafne_server.config import ServerSettings
from dafne_server.db import Family, MergeLease, MergeRun, UpdateRow, User, Version
from dafne_server.runner import prepare
from dafne_server.validation import Case, make_scorer, score_model
from dafne_server.worker import FailureBackoff, claim_lease, families_with_work, merge_family, run_once


@pytest.fixture
def storage(tmp_path, database_url, tiny_leg):
    st = prepare(ServerSettings(data_dir=str(tmp_path / "data"), database_url=database_url))
    with st.session.begin() as session:
        st.add_family(session, "leg", tiny_leg, "test")
        session.add(User(name="site"))
    set_merge(st, buffer_size=3)
    yield st
    st.dispose()


def buffer_update(storage, base, scale: float, n_slices: int = 10, parent: int = 1, seed: int = 0,
                  family: str = "leg") -> str:
    """Store a delta ``scale · noise`` directly as a buffered update (the API's job, tested elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    child = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    blob = encode_delta(make_delta(base, child))
    sha = storage.blobs.put(blob)
    with storage.session.begin() as session:
        user = session.scalar(sa.select(User).where(User.name == "site"))
        row = UpdateRow(id=uuid.uuid4().hex, family=family, user_id=user.id, idempotency_key=uuid.uuid4().hex,
                        parent_version=parent, n_slices=n_slices, client_dice={}, client_version="", blob_sha256=sha,
                        blob_size=len(blob), norm=0.0, status="buffered", reason="")
        session.add(row)
    return row.id


def statuses(storage) -> dict[str, tuple[str, int | None, str]]:
    with storage.session() as session:
        return {r.id: (r.status, r.merged_into, r.reason) for r in session.scalars(sa.select(UpdateRow))}


def distance_scorer(seed_state):
    """Dice that falls as the first convolution moves away from the seed weights."""
    def scorer(model):
        distance = float((model.state_dict["model.0.conv.weight"] - seed_state["model.0.conv.weight"]).abs().mean())
        return {"right soleus": 0.8 - distance, "left soleus": 0.7 - distance / 2}
    return scorer


def publish_version_2(storage, weights, source: str) -> None:
    """Publish version 2 of the "leg" family (parent 1, the seeded manifest) and make it active."""
    with storage.session.begin() as session:
        fam = session.get(Family, "leg")
        storage.new_version(session, fam, storage.load_package(session.scalar(sa.select(Version))).manifest,
                            weights, 1, source, {}, {})


def set_merge(storage, **changes) -> None:
    with storage.session.begin() as session:
        fam = session.get(Family, "leg")
        fam.merge_settings = {**fam.merge_settings, **changes}


def test_buffer_of_k_is_merged_and_published(storage, tiny_leg):
    ids = [buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i) for i in range(2)]
    assert families_with_work(storage) == []  # 2 < K = 3
    ids.append(buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=9))
    assert families_with_work(storage) == ["leg"]
    outcomes = run_once(storage, "w1", lambda family, region: (lambda model: {"a": 0.5, "b": 0.6}))
    assert [o.outcome for o in outcomes] == ["published"] and outcomes[0].version == 2
    assert all(statuses(storage)[i][:2] == ("merged", 2) for i in ids)
    with storage.session() as session:
        version = session.scalar(sa.select(Version).where(Version.number == 2))
        assert session.get(Family, "leg").active_version == 2
        assert version.parent_number == 1 and version.validation["mean"] == pytest.approx(0.55)
        assert version.manifest["provenance"]["merged_updates"] == ids
        assert session.get(MergeLease, "leg").holder is None  # released
    merged = storage.load_package(version).state_dict
    assert any(not torch.equal(merged[k], tiny_leg.state_dict[k]) for k in merged)


def test_worse_candidate_drops_worst_contributor_then_publishes(storage, tiny_leg):
    set_merge(storage, robust_rule="mean", clip_norm=1e6)  # let the bad update through the first attempt
    good = [buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i) for i in range(2)]
    bad = buffer_update(storage, tiny_leg.state_dict, 0.5, seed=7)
    scorer = distance_scorer(tiny_leg.state_dict)

    outcome = merge_family(storage, "leg", "w", scorer) if claim_lease(storage, "leg", "w") else None
    assert outcome.outcome == "published" and outcome.rejected == [bad]
    s = statuses(storage)
    assert s[bad][0] == "rejected" and "most divergent" in s[bad][2]
    assert all(s[i][:2] == ("merged", 2) for i in good)


def test_candidate_still_worse_after_retry_rejects_the_batch(storage, tiny_leg):
    ids = [buffer_update(storage, tiny_leg.state_dict, 0.3, seed=i) for i in range(3)]
    scorer = distance_scorer(tiny_leg.state_dict)

    assert claim_lease(storage, "leg", "w")
    outcome = merge_family(storage, "leg", "w", scorer)
    assert outcome.outcome == "rejected" and outcome.version is None
    s = statuses(storage)
    assert all(s[i][0] == "rejected" for i in ids) and any("mean Dice" in s[i][2] for i in ids)
    with storage.session() as session:
        assert session.get(Family, "leg").active_version == 1
        assert session.scalar(sa.select(sa.func.count()).select_from(Version)) == 1
        run = session.scalar(sa.select(MergeRun))
        assert run.outcome == "rejected" and sorted(run.update_ids) == sorted(ids)


def test_stale_updates_are_rejected_and_forced_merge_takes_fewer_than_k(storage, tiny_leg):
    set_merge(storage, max_staleness=0)
    publish_version_2(storage, tiny_leg.state_dict, "admin")
    stale = buffer_update(storage, tiny_leg.state_dict, 1e-3, parent=1)
    fresh = buffer_update(storage, tiny_leg.state_dict, 1e-3, parent=2, seed=3)
    assert families_with_work(storage) == []
    with storage.session.begin() as session:
        session.get(MergeLease, "leg").force_requested = True
    outcomes = run_once(storage, "w", lambda family, region: None)  # validation disabled
    assert outcomes[0].outcome == "published" and outcomes[0].version == 3
    s = statuses(storage)
    assert s[stale][0] == "rejected" and "stale" in s[stale][2]
    assert s[fresh][:2] == ("merged", 3)
    with storage.session() as session:
        assert not session.get(MergeLease, "leg").force_requested


def test_an_update_buffered_against_a_version_rolled_back_since_is_not_merged(storage, tiny_leg):
    """Uploaded against v2, then an admin re-activated v1: merging it onto v1 would apply a delta
    made for other weights (its staleness, counted by number, would even look negative)."""
    publish_version_2(storage, tiny_leg.state_dict, "merge")
    future = buffer_update(storage, tiny_leg.state_dict, 1e-3, parent=2)
    current = buffer_update(storage, tiny_leg.state_dict, 1e-3, parent=1, seed=4)
    with storage.session.begin() as session:
        storage.activate(session, session.get(Family, "leg"), 1, "admin")
        session.get(MergeLease, "leg").force_requested = True
    outcomes = run_once(storage, "w", lambda family, region: None)
    assert outcomes[0].outcome == "published" and outcomes[0].version == 3
    s = statuses(storage)
    assert s[future][0] == "rejected" and "not in the history" in s[future][2]
    assert s[current][:2] == ("merged", 3)


def test_a_family_whose_merge_raises_does_not_stop_the_others_and_waits_before_retrying(storage, tiny_leg):
    """E.g. a validation folder missing for one family: the other families still merge; the failing
    one keeps its updates buffered, gets one recorded 'failed' run, and is retried on a doubling delay."""
    with storage.session.begin() as session:
        storage.add_family(session, "leg-site-b", tiny_leg, "test")
    for i in range(3):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=10 + i, family="leg-site-b")

    def scorers(family, region):
        if family == "leg":
            raise FileNotFoundError("validation/leg: no such folder")
        return None

    clock = [0.0]
    backoff = FailureBackoff(first_s=10.0, clock=lambda: clock[0])
    outcomes = run_once(storage, "w", scorers, backoff=backoff)
    assert sorted(o.outcome for o in outcomes) == ["failed", "published"]
    assert "no such folder" in next(o.reason for o in outcomes if o.outcome == "failed")
    with storage.session() as session:
        leg_rows = session.scalars(sa.select(UpdateRow).where(UpdateRow.family == "leg")).all()
        assert {r.status for r in leg_rows} == {"buffered"}
        assert [r.outcome for r in session.scalars(sa.select(MergeRun).where(MergeRun.family == "leg"))] == ["failed"]
        assert not session.get(MergeLease, "leg").holder  # released
    assert run_once(storage, "w", scorers, backoff=backoff) == []  # not due yet: not even tried
    clock[0] = 10.0
    assert [o.outcome for o in run_once(storage, "w", scorers, backoff=backoff)] == ["failed"]
    clock[0] = 29.0
    assert run_once(storage, "w", scorers, backoff=backoff) == []  # the second delay is 20 s
    with storage.session() as session:  # one record per streak, not one per poll
        assert len(session.scalars(sa.select(MergeRun).where(MergeRun.family == "leg")).all()) == 1


def test_a_null_setting_stored_by_an_earlier_version_takes_the_default_instead_of_stopping_merges(storage, tiny_leg):
    set_merge(storage, dice_tolerance=None, buffer_size=None)  # what the old PATCH route let an admin store
    for i in range(3):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)
    assert families_with_work(storage) == ["leg"]  # buffer_size: the default 3
    assert [o.outcome for o in run_once(storage, "w", lambda family, region: None)] == ["published"]


def test_lease_held_elsewhere_means_no_merge(storage, tiny_leg):
    for i in range(3):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)
    assert claim_lease(storage, "leg", "other-worker")
    assert run_once(storage, "me", lambda family, region: None) == []
    assert {s for s, _, _ in statuses(storage).values()} == {"buffered"}


def test_score_model_averages_dice_over_cases_per_label(tiny_leg):
    import numpy as np
    import SimpleITK as sitk

    ref = np.zeros((2, 4, 4), np.uint8)
    ref[:, :2] = 1  # right soleus everywhere on the top half
    cases = [Case("a", sitk.GetImageFromArray(ref.astype(np.float32)), sitk.GetImageFromArray(ref))] * 2
    perfect = score_model(tiny_leg, cases, lambda image, model: sitk.Cast(image, sitk.sitkUInt8))
    assert perfect["right soleus"] == 1.0 and math.isnan(perfect["left soleus"])
    empty = make_scorer(cases, lambda image, model: sitk.Image(image.GetSize(), sitk.sitkUInt8))(tiny_leg)
    assert empty["right soleus"] == 0.0


def test_warm_up_scores_each_active_version_once(storage):
    from dafne_server.worker import warm_up

    calls = []

    def factory(family, region):
        return lambda model: calls.append((family, region)) or {"right soleus": 0.5, "left soleus": math.nan}

    warm_up(storage, factory)
    warm_up(storage, factory)
    assert calls == [("leg", "leg")]
    with storage.session() as session:
        version = session.scalar(sa.select(Version))
        assert version.validation == {"dice": {"right soleus": 0.5, "left soleus": None}, "mean": 0.5,
                                      "cases": storage.settings.validation_id}


def test_folder_validation_cases_pair_images_with_labels(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from dafne_logic.core.errors import InputError
    from dafne_server.validation import folder_cases

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        image = sitk.GetImageFromArray(rng.random((3, 8, 8)).astype(np.float32))
        sitk.WriteImage(image, str(tmp_path / f"{name}_image.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 8, 8), np.uint8)), str(tmp_path / f"{name}_labels.nii.gz"))
    (tmp_path / "a_labels.json").write_text("{}")  # a label table beside a label map is not a second label file
    cases = folder_cases(tmp_path)
    assert [c.name for c in cases] == ["a", "b"] and cases[0].labels.GetSize() == (8, 8, 3)
    sitk.WriteImage(sitk.GetImageFromArray(rng.random((3, 8, 8)).astype(np.float32)), str(tmp_path / "c[1]_image.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 8, 8), np.uint8)), str(tmp_path / "c1_labels.nii.gz"))
    with pytest.raises(InputError, match=r"c\[1\]_labels"):  # not c1's labels, which a glob pattern would match
        folder_cases(tmp_path)
    (tmp_path / "c[1]_image.nii.gz").unlink()
    (tmp_path / "b_labels.nii.gz").unlink()
    with pytest.raises(InputError, match="b_labels"):
        folder_cases(tmp_path)
    with pytest.raises(InputError, match="no validation cases"):
        folder_cases(tmp_path / "empty")


def test_lease_is_kept_alive_while_a_long_merge_runs(tmp_path, tiny_leg):
    import time

    from dafne_server.worker import lease_kept_alive

    st = prepare(ServerSettings(data_dir=str(tmp_path / "data"), lease_ttl_s=1.0))
    try:
        with st.session.begin() as session:
            st.add_family(session, "leg", tiny_leg, "test")
        assert claim_lease(st, "leg", "slow-worker")
        with lease_kept_alive(st, "leg", "slow-worker"):
            time.sleep(2.0)  # twice the TTL
            assert not claim_lease(st, "leg", "other-worker")
        time.sleep(1.1)  # no heartbeat any more: the lease expires
        assert claim_lease(st, "leg", "other-worker")
    finally:
        st.dispose()


def test_two_workers_never_merge_the_same_family_at_once(storage, tiny_leg):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    for i in range(6):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)  # two buffers of K = 3
    inside, overlaps = 0, []
    lock = threading.Lock()

    def slow_scorer(model):
        nonlocal inside
        with lock:
            inside += 1
            overlaps.append(inside)
        time.sleep(0.5)
        with lock:
            inside -= 1
        return {"right soleus": 0.5}

    start = threading.Barrier(2)

    def worker(name: str):
        start.wait()  # both look for work at the same moment; a merge then holds the lease ≥ 1 s
        return run_once(storage, name, lambda family, region: slow_scorer)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(worker, ["w1", "w2"]))
    assert max(overlaps) == 1  # never two merges of the family at the same time
    assert sorted(len(r) for r in runs) == [0, 1]  # one worker merged, the other found the lease taken
    with storage.session() as session:
        assert list(session.scalars(sa.select(Version.number).order_by(Version.number))) == [1, 2]
    assert sorted(s for s, _, _ in statuses(storage).values()) == ["buffered"] * 3 + ["merged"] * 3


def _projection_scorer(seed_state, direction):
    """Dice that falls as the weights move along ``direction`` (an attacker's delta), and only then."""
    unit = weights_norm(direction)

    def scorer(model):
        along = sum(float(((model.state_dict[k] - seed_state[k]) * direction[k]).sum()) for k in direction) / unit
        return {"right soleus": 0.8 - 10 * abs(along), "left soleus": 0.7}
    return scorer


def _stored_delta(storage, update_id):
    from dafne_logic.learning.delta import decode_delta

    with storage.session() as session:
        row = session.get(UpdateRow, update_id)
        version = session.scalar(sa.select(Version).where(Version.number == row.parent_version))
        return decode_delta(storage.blobs.get(row.blob_sha256), Manifest.from_json(version.manifest), 1 << 30)


@pytest.mark.parametrize("forced", [False, True], ids=["k2", "forced-2-of-3"])
def test_two_updates_drop_the_attacker_claiming_100000_slices_not_the_honest_one(storage, tiny_leg, forced):
    set_merge(storage, buffer_size=3 if forced else 2)
    honest = buffer_update(storage, tiny_leg.state_dict, 1e-3, n_slices=12, seed=1)
    attacker = buffer_update(storage, tiny_leg.state_dict, 0.05, n_slices=100_000, seed=2)
    if forced:  # an admin's "merge now" of a buffer holding fewer than K
        with storage.session.begin() as session:
            session.get(MergeLease, "leg").force_requested = True
    scorer = _projection_scorer(tiny_leg.state_dict, _stored_delta(storage, attacker))

    outcomes = run_once(storage, "w", lambda family, region: scorer)
    assert [(o.outcome, o.version) for o in outcomes] == [("published", 2)]
    s = statuses(storage)
    assert s[honest] == ("merged", 2, "")
    assert s[attacker][0] == "rejected" and "scored lower on its own" in s[attacker][2]


def test_updates_the_robust_rules_overrode_are_marked_overridden(storage, tiny_leg):
    honest = [buffer_update(storage, tiny_leg.state_dict, 1e-3, n_slices=10 + i, seed=i) for i in range(2)]
    attacker = buffer_update(storage, tiny_leg.state_dict, 0.2, n_slices=100_000, seed=5)
    outcomes = run_once(storage, "w", lambda family, region: None)  # no gate: the robust rules alone
    assert outcomes[0].outcome == "published" and outcomes[0].overridden == [attacker]
    s = statuses(storage)
    assert all(s[i] == ("merged", 2, "") for i in honest)
    assert s[attacker][:2] == ("overridden", 2) and "clipped" in s[attacker][2] and "100000" in s[attacker][2]


def test_rollback_during_a_merge_is_not_undone(storage, tiny_leg):
    set_merge(storage, buffer_size=2)
    publish_version_2(storage, tiny_leg.state_dict, "admin")  # version 2 is active; sites improve it
    for i in range(2):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, parent=2, seed=i)

    def scorer_meanwhile_rolling_back(model):
        with storage.session.begin() as session:  # the admin rolls back to 1 while the merge scores
            fam = session.get(Family, "leg")
            if fam.active_version == 2:
                storage.activate(session, fam, 1, "admin")
        return {"right soleus": 0.5}

    outcomes = run_once(storage, "w", lambda family, region: scorer_meanwhile_rolling_back)
    assert outcomes[0].outcome == "abandoned" and "version 1 was activated" in outcomes[0].reason
    with storage.session() as session:
        assert session.get(Family, "leg").active_version == 1
        assert list(session.scalars(sa.select(Version.number).order_by(Version.number))) == [1, 2]
        assert session.scalar(sa.select(MergeRun)).outcome == "abandoned"
    assert {s for s, _, _ in statuses(storage).values()} == {"buffered"}  # nothing lost

    # The next merge is onto version 1: deltas made against version 2 do not fit it.
    outcomes = run_once(storage, "w", lambda family, region: scorer_meanwhile_rolling_back)
    assert outcomes[0].outcome == "rejected"
    assert all(s[0] == "rejected" and "not in the history of, active version 1" in s[2] for s in statuses(storage).values())
    with storage.session() as session:
        assert session.get(Family, "leg").active_version == 1


def test_cached_active_score_is_reused_only_for_the_same_validation_cases(storage, tiny_leg):
    from dafne_server.worker import active_score

    calls = []

    def scorer(model):
        calls.append(1)
        return {"right soleus": 0.5}

    with storage.session.begin() as session:  # scored by a worker with other cases
        session.scalar(sa.select(Version)).validation = {"dice": {"right soleus": 0.9}, "mean": 0.9,
                                                        "cases": "phantom:5:8x8x8"}
    with storage.session() as session:
        version = session.scalar(sa.select(Version))
    assert active_score(storage, version, scorer) == {"right soleus": 0.5} and len(calls) == 1
    with storage.session() as session:
        version = session.scalar(sa.select(Version))
        assert version.validation["cases"] == storage.settings.validation_id
    assert active_score(storage, version, scorer) == {"right soleus": 0.5} and len(calls) == 1


def test_a_lost_delta_is_rejected_without_a_server_path_and_a_read_error_keeps_it_buffered(storage, tiny_leg, monkeypatch):
    import errno

    lost = buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=1)
    kept = [buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i) for i in (2, 3)]
    with storage.session() as session:
        deltas = {row.blob_sha256 for row in session.scalars(sa.select(UpdateRow))}
        storage.blobs.path(session.get(UpdateRow, lost).blob_sha256).unlink()
    real_get = storage.blobs.get

    def network_storage_hiccup(sha256):  # the deltas only: the active version's weights read fine
        if sha256 in deltas:
            raise OSError(errno.ESTALE, "Stale file handle", str(storage.blobs.path(sha256)))
        return real_get(sha256)

    with monkeypatch.context() as patch:  # accepted uploads must not be discarded for a passing hiccup
        patch.setattr(storage.blobs, "get", network_storage_hiccup)
        outcomes = run_once(storage, "w", lambda family, region: None)
    assert [o.outcome for o in outcomes] == ["failed"] and "Stale file handle" in outcomes[0].reason
    assert {statuses(storage)[i][0] for i in [lost, *kept]} == {"buffered"}
    assert [o.outcome for o in run_once(storage, "w", lambda family, region: None)] == ["published"]
    status, _, reason = statuses(storage)[lost]
    assert status == "rejected" and "lost" in reason and str(storage.blobs.root) not in reason
    assert all(statuses(storage)[i][:2] == ("merged", 2) for i in kept)


def test_an_update_whose_delta_cannot_be_read_for_good_is_rejected_and_the_family_merges(storage, tiny_leg, monkeypatch):
    import errno

    bad = buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=1)
    good = [buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i) for i in (2, 3)]
    with storage.session() as session:
        unreadable = session.get(UpdateRow, bad).blob_sha256
    real_get = storage.blobs.get

    def bad_sector(sha256):
        if sha256 == unreadable:
            raise OSError(errno.EIO, "Input/output error", str(storage.blobs.path(sha256)))
        return real_get(sha256)

    monkeypatch.setattr(storage.blobs, "get", bad_sector)
    assert [o.outcome for o in run_once(storage, "w", lambda family, region: None)] == ["published"]
    status, _, reason = statuses(storage)[bad]
    assert status == "rejected" and "unreadable" in reason and str(storage.blobs.root) not in reason
    assert all(statuses(storage)[i][:2] == ("merged", 2) for i in good)


def test_a_forced_merge_stands_until_every_buffered_update_is_merged(storage, tiny_leg):
    """K = 3 with 5 buffered: the forced merge takes 3, and the 2 left do not wait for a third."""
    ids = [buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i) for i in range(5)]
    with storage.session.begin() as session:
        session.get(MergeLease, "leg").force_requested = True
    assert [o.version for o in run_once(storage, "w", lambda family, region: None)] == [2]
    assert families_with_work(storage) == ["leg"]
    assert [o.version for o in run_once(storage, "w", lambda family, region: None)] == [3]
    assert {statuses(storage)[i][1] for i in ids} == {2, 3}
    with storage.session() as session:
        assert not session.get(MergeLease, "leg").force_requested
    assert families_with_work(storage) == []


def test_publishing_writes_the_weights_before_taking_the_database_write_lock(tmp_path, tiny_leg, monkeypatch):
    """The blob's fsyncs inside the publishing transaction held SQLite's write lock (PostgreSQL: the
    family row) meanwhile: every upload waited, and past the busy timeout failed with a 500. SQLite
    only: its database-wide lock can be probed from another connection."""
    import sqlite3

    storage = prepare(ServerSettings(data_dir=str(tmp_path / "data")))
    with storage.session.begin() as session:
        storage.add_family(session, "leg", tiny_leg, "test")
        session.add(User(name="site"))
    set_merge(storage, buffer_size=3)
    database = Path(storage.settings.data_dir) / "server.db"
    real_put = type(storage.blobs).put
    writable_meanwhile = []

    def put_while_an_upload_tries_to_write(self, data):
        other = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # what an upload's transaction starts with
            other.execute("ROLLBACK")
            writable_meanwhile.append(True)
        except sqlite3.OperationalError:  # database is locked
            writable_meanwhile.append(False)
        finally:
            other.close()
        return real_put(self, data)

    for i in range(3):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)
    monkeypatch.setattr(type(storage.blobs), "put", put_while_an_upload_tries_to_write)
    assert [o.version for o in run_once(storage, "w", lambda family, region: None)] == [2]
    assert writable_meanwhile == [True]
    with storage.session() as session:
        version = session.scalar(sa.select(Version).where(Version.number == 2))
        package = storage.load_package(version)  # the blob the row names, as its manifest describes it
    assert package.manifest.weights_sha256 == version.weights_sha256 and storage.blobs.exists(version.weights_sha256)
    storage.dispose()


def test_uploads_arriving_during_a_forced_merge_do_not_keep_it_forced(storage, tiny_leg):
    """Otherwise a steady stream of uploads would keep every merge forced, below K (and below what
    the robust rules need)."""
    for i in range(3):
        buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=i)
    late = buffer_update(storage, tiny_leg.state_dict, 1e-3, seed=7)
    with storage.session.begin() as session:
        session.get(UpdateRow, late).created_at += 3600.0  # arrives while the merge runs
        session.get(MergeLease, "leg").force_requested = True
    assert [o.version for o in run_once(storage, "w", lambda family, region: None)] == [2]
    assert statuses(storage)[late][0] == "buffered" and families_with_work(storage) == []  # waits for K
