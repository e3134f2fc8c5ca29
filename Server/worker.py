"""The merge worker: runs apart from the request handlers (its own process), one merge per family.

Exclusion across any number of worker processes (and API hosts) is a lease row per family,
claimed by one atomic conditional ``UPDATE … WHERE holder IS NULL OR expires_at < now``: on
SQLite the write lock serialises it, on PostgreSQL the row lock does, so exactly one claimer
sees ``rowcount == 1``. Publication re-checks the lease inside its transaction (fencing), so a
worker that lost its lease (paused, then expired) cannot publish.

A merge: take the oldest K buffered updates (fewer when an admin forced it), apply
:func:`dafne_server.merging.merge_updates` to the active version, score the candidate on the
family's validation cases, publish if :func:`accept_candidate` agrees, else drop the worst
contributor and try once more; otherwise reject the batch with the reason. Updates stay
*buffered* until the transaction that merges or rejects them commits, so a killed worker loses
nothing: the next one takes the same updates again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select, update

from dafne_logic.core.errors import DafneError
from dafne_logic.core.numbers import nanmean, strict_json
from dafne_logic.inference.model_package import Manifest, ModelPackage
from dafne_logic.learning.delta import decode_delta

from . import crud
from .config import ServerSettings
from .db import Family, MergeLease, MergeRun, UpdateRow, Version, audit, now
from .merging import (
    Decision,
    MergeResult,
    MergeSettings,
    Update,
    accept_candidate,
    apply_merged,
    merge_updates,
    worst_contributor,
)
from .storage import Storage
from .validation import Scorer, folder_cases, make_scorer, phantom_cases

log = logging.getLogger(__name__)
ScorerFactory = Callable[[str, str], Scorer | None]  # (family, region) -> scorer, None = no validation


class LeaseLost(RuntimeError):
    """Another worker holds the family's merge lease now."""


@dataclass
class MergeOutcome:
    outcome: str  # "published", "rejected" or "idle"
    version: int | None = None
    merged: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    reason: str = ""


def new_holder() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim_lease(storage: Storage, family: str, holder: str) -> bool:
    """Take the family's merge lease if free or expired (atomic; True when this caller got it)."""
    t = now()
    with storage.engine.begin() as conn:
        result = conn.execute(update(MergeLease).where(
            MergeLease.family == family,
            or_(MergeLease.holder.is_(None), MergeLease.holder == holder, MergeLease.expires_at < t),
        ).values(holder=holder, expires_at=t + storage.settings.lease_ttl_s))
        return result.rowcount == 1


def renew_lease(conn_or_session, storage: Storage, family: str, holder: str) -> None:  # noqa: ANN001
    result = conn_or_session.execute(update(MergeLease).where(
        MergeLease.family == family, MergeLease.holder == holder,
    ).values(expires_at=now() + storage.settings.lease_ttl_s))
    if result.rowcount != 1:
        raise LeaseLost(f"the merge lease of {family} was taken over")


def release_lease(storage: Storage, family: str, holder: str) -> None:
    with storage.engine.begin() as conn:
        conn.execute(update(MergeLease).where(MergeLease.family == family, MergeLease.holder == holder)
                     .values(holder=None, expires_at=0.0))


def _heartbeat(storage: Storage, family: str, holder: str) -> None:
    with storage.engine.begin() as conn:
        renew_lease(conn, storage, family, holder)


def families_with_work(storage: Storage) -> list[str]:
    """Families whose buffer holds ≥ K updates, or where an admin forced a merge of ≥ 1."""
    with storage.read() as session:
        counts = dict(session.execute(select(UpdateRow.family, func.count()).where(UpdateRow.status == "buffered")
                                      .group_by(UpdateRow.family)).all())
        out = []
        pairs = session.execute(select(Family, MergeLease).join(MergeLease, MergeLease.family == Family.name))
        for fam, lease in pairs:
            n = counts.get(fam.name, 0)
            if n and (lease.force_requested or n >= MergeSettings.from_json(fam.merge_settings).buffer_size):
                out.append(fam.name)
        return out


def _validation(dice: dict[str, float]) -> dict:
    """JSON has no NaN (PostgreSQL refuses it): an undefined Dice is stored as null."""
    return strict_json({"dice": dice, "mean": nanmean(dice.values())})


def active_score(storage: Storage, version: Version, scorer: Scorer | None,
                 package: ModelPackage | None = None) -> dict[str, float] | None:
    """Dice per label of ``version`` on the validation cases, scored once and kept with the version
    (a cache of its score, not a change to the immutable weights); None without a scorer."""
    cached = version.validation.get("dice")
    if cached is not None:
        return {k: math.nan if v is None else v for k, v in cached.items()}
    if scorer is None:
        return None
    dice = scorer(package or storage.load_package(version))
    with storage.session.begin() as session:
        session.get(Version, version.id).validation = _validation(dice)
    return dice


def warm_up(storage: Storage, scorers: ScorerFactory) -> None:
    """Build every family's validation cases and score its active version before the first upload,
    so the first merge costs what later ones do."""
    with storage.read() as session:
        actives = list(session.execute(select(Family.name, Family.region, Version).join(
            Version, (Version.family == Family.name) & (Version.number == Family.active_version))))
    for family, region, version in actives:
        active_score(storage, version, scorers(family, region))


def merge_family(storage: Storage, family: str, holder: str, scorer: Scorer | None) -> MergeOutcome:
    """One merge of ``family`` under a lease already held by ``holder`` (see the module docstring)."""
    with storage.read() as session:
        fam = session.get(Family, family)
        settings = MergeSettings.from_json(fam.merge_settings)
        active = session.scalar(select(Version).where(Version.family == family, Version.number == fam.active_version))
        rows = list(session.scalars(select(UpdateRow).where(UpdateRow.family == family, UpdateRow.status == "buffered")
                                    .order_by(UpdateRow.created_at, UpdateRow.id).limit(settings.buffer_size)))
        parents = {v.number: v for v in session.scalars(select(Version).where(
            Version.family == family, Version.number.in_({r.parent_version for r in rows})))}
        lineage = crud.ancestry(session, active, settings.max_staleness)  # version -> staleness τ
    if not rows:
        return MergeOutcome("idle")
    started = now()
    scoring_s = 0.0
    base = storage.load_package(active)

    updates: list[Update] = []
    refused: dict[str, str] = {}
    for row in rows:
        staleness = lineage.get(row.parent_version)
        if staleness is None or row.parent_version not in parents:  # too old, or rolled back since the upload
            refused[row.id] = (f"parent version {row.parent_version} is too stale for, or not in the history of, "
                               f"active version {active.number}")
            continue
        try:
            parent_manifest = Manifest.from_json(parents[row.parent_version].manifest)
            delta = decode_delta(storage.blobs.get(row.blob_sha256), parent_manifest, storage.settings.max_delta_bytes)
        except (OSError, DafneError) as exc:
            refused[row.id] = f"stored delta unreadable: {exc}"
            continue
        updates.append(Update(row.id, delta, staleness, row.n_slices))

    active_dice = active_score(storage, active, scorer, base)
    _heartbeat(storage, family, holder)

    def attempt(batch: list[Update]) -> tuple[dict, dict[str, float], Decision, MergeResult]:
        result = merge_updates(batch, settings)
        state = apply_merged(base.state_dict, result.delta, settings.server_lr)
        if scorer is None:
            return state, {}, Decision(True, "published without validation (validation disabled)",
                                       math.nan, math.nan), result
        nonlocal scoring_s
        t0 = time.monotonic()
        dice = scorer(ModelPackage(base.manifest, state))
        scoring_s += time.monotonic() - t0
        _heartbeat(storage, family, holder)
        decision = accept_candidate(dice, active_dice, settings.dice_tolerance, settings.label_tolerance)
        return state, dice, decision, result

    state, dice, decision, rule, batch = None, {}, None, "", list(updates)
    if batch:
        state, dice, decision, result = attempt(batch)
        if not decision.accepted and len(batch) >= 2:
            worst = worst_contributor(batch, result.delta)
            refused[worst] = f"dropped as the most divergent update after: {decision.reason}"
            batch = [u for u in batch if u.key != worst]
            state, dice, decision, result = attempt(batch)
        rule = result.rule
        if not decision.accepted:
            refused.update({u.key: f"candidate refused: {decision.reason}" for u in batch})
            batch = []

    _hold(storage, family, holder)
    with storage.session.begin() as session:
        renew_lease(session, storage, family, holder)  # fencing: publish only while holding the lease
        fam = session.get(Family, family)
        version = None
        if batch:
            version = storage.new_version(session, fam, base.manifest, state, active.number, "merge",
                                          _validation(dice),
                                          {"merged_updates": [u.key for u in batch], "merge_rule": rule,
                                           "server_lr": settings.server_lr})
        for row in session.scalars(select(UpdateRow).where(UpdateRow.id.in_([r.id for r in rows]))):
            if row.status != "buffered":
                continue
            if version is not None and row.id not in refused:
                row.status, row.merged_into, row.reason = "merged", version.number, ""
            else:
                row.status, row.reason = "rejected", refused.get(row.id, "not merged")
            row.updated_at = now()
        reason = decision.reason if decision is not None else "no usable update in the buffer"
        session.add(MergeRun(family=family, started_at=started, finished_at=now(),
                             outcome="published" if version else "rejected",
                             version=version.number if version else None, update_ids=[r.id for r in rows],
                             detail={"reason": reason, "rule": rule, "candidate_dice": strict_json(dice),
                                     "rejected": refused, "seconds": round(now() - started, 3),
                                     "scoring_seconds": round(scoring_s, 3)}))
        session.get(MergeLease, family).force_requested = False
        audit(session, "merge-worker", "merge_published" if version else "merge_rejected", family,
              version=version.number if version else None, merged=[u.key for u in batch],
              rejected=sorted(refused), reason=reason)
    outcome = MergeOutcome("published" if version else "rejected", version.number if version else None,
                           [u.key for u in batch], sorted(refused), reason)
    log.info("merge %s: %s %s in %.1f s, %.1f s scoring (%s)", family, outcome.outcome, outcome.version or "",
             now() - started, scoring_s, reason)
    return outcome


def _hold(storage: Storage, family: str, holder: str) -> None:
    """Fault-injection tests: keep the lease for ``merge_hold_s`` before publishing."""
    if storage.settings.merge_hold_s > 0:
        time.sleep(storage.settings.merge_hold_s)
        _heartbeat(storage, family, holder)


@contextlib.contextmanager
def lease_kept_alive(storage: Storage, family: str, holder: str) -> Iterator[None]:
    """Renew the lease every third of its TTL from a thread while a merge runs: scoring a candidate
    can take longer than the TTL, and another worker must not take over a live merge."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.settings.lease_ttl_s / 3):
            try:
                _heartbeat(storage, family, holder)
            except LeaseLost:
                return  # the publishing transaction's fencing check will abort the merge
            except Exception:  # a database hiccup: try again at the next beat
                log.exception("lease heartbeat of %s failed", family)

    thread = threading.Thread(target=beat, name=f"lease-{family}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def default_scorer_factory(settings: ServerSettings) -> ScorerFactory:
    """Scorers from ``settings.validation``, cases built once per family and kept."""
    cache: dict[str, Scorer | None] = {}

    def factory(family: str, region: str) -> Scorer | None:
        if family not in cache:
            if settings.validation == "none":
                cache[family] = None
            elif settings.validation == "phantom":
                cache[family] = make_scorer(phantom_cases(region, settings.validation_cases,
                                                          settings.validation_shape))
            else:
                cache[family] = make_scorer(folder_cases(os.path.join(settings.validation, family)))
        return cache[family]

    return factory


def run_once(storage: Storage, holder: str, scorers: ScorerFactory) -> list[MergeOutcome]:
    """Merge every family that has work and whose lease this worker can claim."""
    outcomes = []
    for family in families_with_work(storage):
        if not claim_lease(storage, family, holder):
            continue
        try:
            with storage.read() as session:
                region = session.get(Family, family).region
            with lease_kept_alive(storage, family, holder):
                outcomes.append(merge_family(storage, family, holder, scorers(family, region)))
        except LeaseLost:
            log.warning("merge of %s abandoned: lease lost", family)
        finally:
            release_lease(storage, family, holder)
    return outcomes


def run_worker(settings: ServerSettings, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Poll for work until ``should_stop()`` or the parent process goes away."""
    storage = Storage(settings)
    holder = new_holder()
    scorers = default_scorer_factory(settings)
    parent = os.getppid()
    log.info("merge worker %s started", holder)
    try:
        warm_up(storage, scorers)
    except Exception:  # scoring is retried at the first merge; serving must not depend on it
        log.exception("validation warm-up failed")
    log.info("merge worker %s ready", holder)
    while not should_stop() and os.getppid() == parent:
        try:
            run_once(storage, holder, scorers)
        except Exception:  # keep serving other families; the failed batch stays buffered
            log.exception("merge worker iteration failed")
            time.sleep(5 * settings.poll_interval_s)
        time.sleep(settings.poll_interval_s)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s merge-worker %(message)s")
    run_worker(ServerSettings.from_env())


if __name__ == "__main__":
    main()
