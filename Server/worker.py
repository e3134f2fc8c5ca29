"""The merge worker: runs apart from the request handlers (its own process), one merge per family.

Exclusion across any number of worker processes (and API hosts) is a lease row per family,
claimed by one atomic conditional ``UPDATE … WHERE holder IS NULL OR expires_at < now`` (``now``
by the database's clock, not the host's): on
SQLite the write lock serialises it, on PostgreSQL the row lock does, so exactly one claimer
sees ``rowcount == 1``. Publication re-checks the lease inside its transaction (fencing), so a
worker that lost its lease (paused, then expired) cannot publish.

A merge (:func:`merge_family`) runs four named steps: :func:`read_buffer` takes the oldest K
buffered updates (fewer when an admin forced it) and the active version; :func:`decode_updates`
refuses stale, future-parent or unreadable ones; :func:`choose_candidate` applies
:func:`dafne_server.merging.merge_updates` to the active version, scores the candidate on the
family's validation cases and, if :func:`accept_candidate` refuses it, drops one update and tries
once more; :func:`publish` records the outcome in one transaction, and publishes only if the merge's
base is still the active version (an admin's rollback during the merge wins: the run is
*abandoned* and its updates stay buffered). Updates stay *buffered* until that transaction
commits, so a killed worker loses nothing: the next one takes the same updates again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import ColumnElement, func, or_, select, update

from dafne_logic.core.errors import DafneError
from dafne_logic.core.numbers import nanmean, strict_json
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.learning.delta import decode_delta

from . import crud
from .config import ServerSettings
from .db import Family, MergeLease, MergeRun, UpdateRow, Version, audit, now
from .heartbeat import Heartbeat
from .merging import (
    Decision,
    MergeResult,
    MergeSettings,
    Update,
    accept_candidate,
    apply_merged,
    lowest_scoring,
    merge_updates,
    worst_contributor,
)
from .storage import Storage
from .validation import Scorer, folder_cases, make_scorer, phantom_cases

log = logging.getLogger(__name__)
# Read errors of a stored delta worth a retry (network file systems); others reject the update.
TRANSIENT_READ_ERRORS = {errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EBUSY}
ScorerFactory = Callable[[str, str], Scorer | None]  # (family, region) -> scorer, None = no validation


class LeaseLost(RuntimeError):
    """Another worker holds the family's merge lease now."""


@dataclass
class MergeOutcome:
    outcome: str  # "published", "rejected", "abandoned" (the base was deactivated meanwhile), "failed" or "idle"
    version: int | None = None
    merged: list[str] = field(default_factory=list)  # merged or overridden
    rejected: list[str] = field(default_factory=list)
    reason: str = ""
    overridden: list[str] = field(default_factory=list)


def new_holder() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_time(conn_or_session) -> float:  # noqa: ANN001
    """Seconds since the epoch by the database server's clock. Leases are written and compared by it:
    workers on several hosts share one database, not one clock (a host a minute ahead would take
    over every live lease)."""
    bind = conn_or_session if hasattr(conn_or_session, "dialect") else conn_or_session.get_bind()
    expression: ColumnElement[Any]
    if bind.dialect.name == "postgresql":
        expression = func.extract("epoch", func.clock_timestamp())
    else:  # SQLite: a file on this host, read by this host's clock anyway
        expression = (func.julianday("now") - 2440587.5) * 86400.0
    return float(conn_or_session.scalar(select(expression)))


def claim_lease(storage: Storage, family: str, holder: str) -> bool:
    """Take the family's merge lease if free or expired (atomic; True when this caller got it)."""
    with storage.engine.begin() as conn:
        t = database_time(conn)
        result = conn.execute(update(MergeLease).where(
            MergeLease.family == family,
            or_(MergeLease.holder.is_(None), MergeLease.holder == holder, MergeLease.expires_at < t),
        ).values(holder=holder, expires_at=t + storage.settings.lease_ttl_s))
        return result.rowcount == 1


def renew_lease(conn_or_session, storage: Storage, family: str, holder: str) -> None:  # noqa: ANN001
    result = conn_or_session.execute(update(MergeLease).where(
        MergeLease.family == family, MergeLease.holder == holder,
    ).values(expires_at=database_time(conn_or_session) + storage.settings.lease_ttl_s))
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


def _validation(dice: dict[str, float], settings: ServerSettings) -> dict:
    """A version's validation record: Dice per label, their mean, and which cases gave them.
    JSON has no NaN (PostgreSQL refuses it): an undefined Dice is stored as null."""
    return strict_json({"dice": dice, "mean": nanmean(dice.values()), "cases": settings.validation_id})


def active_score(storage: Storage, version: Version, scorer: Scorer | None,
                 package: ModelPackage | None = None) -> dict[str, float] | None:
    """Dice per label of ``version`` on the validation cases, scored once and kept with the version
    (a cache of its score, not a change to the immutable weights); None without a scorer.

    Every worker shares the cache, so it is used only when it was scored on the same cases
    (``ServerSettings.validation_id``); otherwise the version is scored again and the cache replaced.
    """
    cached = version.validation.get("dice")
    if cached is not None and version.validation.get("cases") == storage.settings.validation_id:
        return {k: math.nan if v is None else v for k, v in cached.items()}
    if scorer is None:
        return None
    dice = scorer(package or storage.load_package(version))
    with storage.session.begin() as session:
        session.get(Version, version.id).validation = _validation(dice, storage.settings)
    return dice


def warm_up(storage: Storage, scorers: ScorerFactory) -> None:
    """Build every family's validation cases and score its active version before the first upload,
    so the first merge costs what later ones do."""
    with storage.read() as session:
        actives = list(session.execute(select(Family.name, Family.region, Version).join(
            Version, (Version.family == Family.name) & (Version.number == Family.active_version))))
    for family, region, version in actives:
        active_score(storage, version, scorers(family, region))


@dataclass
class MergeInputs:
    """What one merge reads at its start: the settings, the base it merges onto and its buffer."""

    settings: MergeSettings
    active: Version
    base: ModelPackage
    rows: list[UpdateRow]
    parents: dict[int, Version]
    lineage: dict[int, int]  # version number -> staleness: the active version and its ancestors


@dataclass
class Candidate:
    """A merged model and the gate's verdict on it."""

    batch: list[Update]
    result: MergeResult
    state: dict
    dice: dict[str, float]
    decision: Decision


def read_buffer(storage: Storage, family: str) -> MergeInputs | None:
    """Step 1: the family's settings, active version and oldest K buffered updates (None: no work)."""
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
        return None
    return MergeInputs(settings, active, storage.load_package(active), rows, parents, lineage)


def decode_updates(storage: Storage, inputs: MergeInputs) -> tuple[list[Update], dict[str, str]]:
    """Step 2: the buffered deltas the merge may use, and the reason for each one it may not."""
    updates: list[Update] = []
    refused: dict[str, str] = {}
    active = inputs.active.number
    for row in inputs.rows:
        staleness = inputs.lineage.get(row.parent_version)
        if staleness is None or row.parent_version not in inputs.parents:  # too old, or rolled back since the upload
            refused[row.id] = (f"parent version {row.parent_version} is too stale for, or not in the history of, "
                               f"active version {active}")
            continue
        try:
            stored = storage.blobs.get(row.blob_sha256)
        except OSError as exc:
            # A network-storage hiccup fails the merge, retried later with the update still buffered;
            # anything lasting (lost, unreadable) rejects it, or the family would never merge again.
            # The owner sees no server path; the log has it.
            if exc.errno in TRANSIENT_READ_ERRORS:
                raise
            log.error("update %s: its delta blob %s cannot be read: %s", row.id, row.blob_sha256, exc)
            lost = isinstance(exc, FileNotFoundError)
            refused[row.id] = f"stored delta {'lost' if lost else 'unreadable'} on the server; upload it again"
            continue
        try:
            parent_manifest = Manifest.from_json(inputs.parents[row.parent_version].manifest)
            delta = decode_delta(stored, parent_manifest, storage.settings.max_delta_bytes)
        except DafneError as exc:
            refused[row.id] = f"stored delta unreadable: {exc}"
            continue
        updates.append(Update(row.id, delta, staleness, row.n_slices))
    return updates, refused


class CandidateJudge:
    """Step 3's tools: merge a batch onto the base, score it and ask the gate (timing the scoring)."""

    def __init__(self, inputs: MergeInputs, scorer: Scorer | None, active_dice: dict[str, float] | None,
                 heartbeat: Callable[[], None]) -> None:
        self.inputs = inputs
        self.scorer = scorer
        self.active_dice = active_dice
        self.heartbeat = heartbeat
        self.scoring_s = 0.0

    def judge(self, batch: list[Update]) -> Candidate:
        settings = self.inputs.settings
        result = merge_updates(batch, settings)
        state = apply_merged(self.inputs.base.state_dict, result.delta, settings.server_lr)
        if self.scorer is None:
            return Candidate(batch, result, state, {},
                             Decision(True, "published without validation (validation disabled)", math.nan, math.nan))
        t0 = time.monotonic()
        dice = self.scorer(ModelPackage(self.inputs.base.manifest, state))
        self.scoring_s += time.monotonic() - t0
        self.heartbeat()
        decision = accept_candidate(dice, self.active_dice or {}, settings.dice_tolerance, settings.label_tolerance)
        return Candidate(batch, result, state, dice, decision)


def choose_candidate(updates: list[Update], judge: CandidateJudge, refused: dict[str, str]) -> Candidate | None:
    """Step 3: the candidate to publish, or the last refused one (None: no usable update).

    A refused candidate loses one update and is tried once more: of three or more the one farthest
    from the merged delta, of two the one whose candidate scores lower on its own (both are equally
    far from their mean, so distance cannot tell an attacker from an honest site).
    """
    if not updates:
        return None
    candidate = judge.judge(updates)
    if candidate.decision.accepted or len(updates) < 2:
        return candidate
    if len(updates) == 2:
        alone = {u.key: judge.judge([u]) for u in updates}
        worst = lowest_scoring({key: c.decision for key, c in alone.items()})
        retry = next(c for key, c in alone.items() if key != worst)
        refused[worst] = f"dropped: its candidate scored lower on its own than the other update's after: " \
                         f"{candidate.decision.reason}"
        return retry
    worst = worst_contributor(updates, candidate.result.delta)
    refused[worst] = f"dropped as the most divergent update after: {candidate.decision.reason}"
    return judge.judge([u for u in updates if u.key != worst])


def publish(storage: Storage, family: str, holder: str, inputs: MergeInputs, candidate: Candidate | None,
            refused: dict[str, str], started: float, scoring_s: float) -> MergeOutcome:
    """Step 4, one transaction: the new version (if the gate accepted and the base is still the
    active version), every update's fate, the run's record and the audit entry."""
    chosen = candidate if candidate is not None and candidate.decision.accepted else None
    if candidate is not None and chosen is None:
        refused.update({u.key: f"candidate refused: {candidate.decision.reason}" for u in candidate.batch})
    batch = chosen.batch if chosen is not None else []
    overridden = chosen.result.overridden if chosen is not None else {}
    reason = candidate.decision.reason if candidate is not None else "no usable update in the buffer"
    row_ids = [r.id for r in inputs.rows]
    # The blob first, outside the transaction (fsyncs): an abandoned publish leaves an orphan for gc.
    stored = storage.store_weights(chosen.state) if chosen is not None else None
    with storage.session.begin() as session:
        renew_lease(session, storage, family, holder)  # fencing: publish only while holding the lease
        # An admin's activation waits for us, or we see it. NO KEY UPDATE (PostgreSQL): uploads'
        # foreign-key checks on the family row do not wait for this transaction.
        fam = session.get(Family, family, with_for_update={"key_share": True})
        if fam.active_version != inputs.active.number:
            # An admin activated another version while we merged: publishing onto the old base
            # would undo the rollback. The updates stay buffered for a merge onto the new one.
            reason = f"abandoned: version {fam.active_version} was activated during the merge onto {inputs.active.number}"
            session.add(MergeRun(family=family, started_at=started, finished_at=now(), outcome="abandoned",
                                 version=None, update_ids=row_ids, detail={"reason": reason}))
            audit(session, "merge-worker", "merge_abandoned", family, base=inputs.active.number,
                  active=fam.active_version)
            log.info("merge %s: %s", family, reason)
            return MergeOutcome("abandoned", reason=reason)
        version = None
        if chosen is not None:
            version = storage.new_version(session, fam, inputs.base.manifest, chosen.state, inputs.active.number,
                                          "merge", _validation(chosen.dice, storage.settings),
                                          {"merged_updates": [u.key for u in batch],
                                           "merge_rule": chosen.result.rule,
                                           "server_lr": inputs.settings.server_lr}, stored=stored)
        for row in session.scalars(select(UpdateRow).where(UpdateRow.id.in_(row_ids))):
            if row.status != "buffered":
                continue
            if version is not None and row.id not in refused:
                status = "overridden" if row.id in overridden else "merged"
                row.status, row.merged_into, row.reason = status, version.number, overridden.get(row.id, "")
            else:
                row.status, row.reason = "rejected", refused.get(row.id, "not merged")
            row.updated_at = now()
        dice = candidate.dice if candidate is not None else {}
        session.add(MergeRun(family=family, started_at=started, finished_at=now(),
                             outcome="published" if version else "rejected",
                             version=version.number if version else None, update_ids=row_ids,
                             detail={"reason": reason, "rule": candidate.result.rule if candidate else "",
                                     "candidate_dice": strict_json(dice), "rejected": refused,
                                     "overridden": overridden, "seconds": round(now() - started, 3),
                                     "scoring_seconds": round(scoring_s, 3)}))
        # A forced merge takes at most K updates: the request stands while updates that were already
        # buffered when this merge began are left, so none of them waits for K more. Later arrivals do
        # not keep it (a steady stream would otherwise keep every merge forced, below K).
        left = session.scalar(select(func.count()).select_from(UpdateRow).where(
            UpdateRow.family == family, UpdateRow.status == "buffered", UpdateRow.id.not_in(row_ids),
            UpdateRow.created_at <= started)) or 0
        if not left:
            session.get(MergeLease, family).force_requested = False
        audit(session, "merge-worker", "merge_published" if version else "merge_rejected", family,
              version=version.number if version else None, merged=[u.key for u in batch],
              overridden=sorted(overridden), rejected=sorted(refused), reason=reason)
    outcome = MergeOutcome("published" if version else "rejected", version.number if version else None,
                           [u.key for u in batch], sorted(refused), reason, sorted(overridden))
    log.info("merge %s: %s %s in %.1f s, %.1f s scoring (%s)", family, outcome.outcome, outcome.version or "",
             now() - started, scoring_s, reason)
    return outcome


def merge_family(storage: Storage, family: str, holder: str, scorer: Scorer | None) -> MergeOutcome:
    """One merge of ``family`` under a lease already held by ``holder`` (see the module docstring)."""
    inputs = read_buffer(storage, family)
    if inputs is None:
        return MergeOutcome("idle")
    started = now()
    updates, refused = decode_updates(storage, inputs)
    active_dice = active_score(storage, inputs.active, scorer, inputs.base)
    _heartbeat(storage, family, holder)
    judge = CandidateJudge(inputs, scorer, active_dice, lambda: _heartbeat(storage, family, holder))
    candidate = choose_candidate(updates, judge, refused)
    _hold(storage, family, holder)
    return publish(storage, family, holder, inputs, candidate, refused, started, judge.scoring_s)


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


class FailureBackoff:
    """Families whose merge raised, and when to try each again: after ``first_s``, doubling with
    every failure in a row up to ``cap_s``. One family's broken settings or validation folder must
    neither stop the others nor be retried (and logged) at every poll."""

    def __init__(self, first_s: float, cap_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.first_s, self.cap_s, self._clock = first_s, cap_s, clock
        self._streak: dict[str, int] = {}
        self._next_try: dict[str, float] = {}

    def due(self, family: str) -> bool:
        return self._clock() >= self._next_try.get(family, 0.0)

    def failed(self, family: str) -> int:
        """Note a failure; returns how many in a row."""
        streak = self._streak.get(family, 0) + 1
        self._streak[family] = streak
        self._next_try[family] = self._clock() + min(self.cap_s, self.first_s * 2 ** (streak - 1))
        return streak

    def succeeded(self, family: str) -> None:
        self._streak.pop(family, None)
        self._next_try.pop(family, None)


def record_failed_merge(storage: Storage, family: str, started: float, reason: str) -> None:
    """A ``failed`` merge run (the dashboard, which every contributor may read, lists recent runs: it
    names no internals) and the error itself in the admin-only audit log; the updates stay buffered."""
    with storage.session.begin() as session:
        session.add(MergeRun(family=family, started_at=started, finished_at=now(), outcome="failed", version=None,
                             update_ids=[], detail={"reason": "the merge failed; the error is in the audit log "
                                                               "(merge_failed) and the server log"}))
        audit(session, "merge-worker", "merge_failed", family, reason=reason)


def run_once(storage: Storage, holder: str, scorers: ScorerFactory,
             report: Callable[[str], None] = lambda state: None,
             backoff: FailureBackoff | None = None) -> list[MergeOutcome]:
    """Merge every family that has work and whose lease this worker can claim; ``report`` hears
    each step (``merging <family>``) for the heartbeat.

    A family whose merge raises gets a ``failed`` outcome (and, on the first failure in a row, a
    recorded run) while the others go on; with ``backoff`` it is skipped until its retry is due.
    """
    backoff = backoff or FailureBackoff(0.0)
    outcomes = []
    for family in families_with_work(storage):
        if not backoff.due(family) or not claim_lease(storage, family, holder):
            continue
        report(f"merging {family}")
        started = now()
        try:
            with storage.read() as session:
                region = session.get(Family, family).region
            with lease_kept_alive(storage, family, holder):
                outcomes.append(merge_family(storage, family, holder, scorers(family, region)))
            backoff.succeeded(family)
        except LeaseLost:
            log.warning("merge of %s abandoned: lease lost", family)
        except Exception as exc:  # noqa: BLE001 - isolate the family; its updates stay buffered
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:500]
            log.exception("merge of %s failed (its updates stay buffered)", family)
            if backoff.failed(family) == 1:
                try:
                    record_failed_merge(storage, family, started, reason)
                except Exception:  # noqa: BLE001 - the database itself may be what failed
                    log.exception("could not record the failed merge of %s", family)
            outcomes.append(MergeOutcome("failed", reason=reason))
        finally:
            release_lease(storage, family, holder)
    return outcomes


LIFELINE_GRACE_S = 5.0  # after its parent is gone, a worker may finish a step this long, then exits


def watch_lifeline(stop: threading.Event, stream: BinaryIO) -> threading.Thread:
    """End this process when ``stream`` (a pipe whose other end only the parent holds) reaches EOF.

    The parent's death closes its end on every platform (POSIX reparenting and ``getppid`` do not
    exist as such on Windows), as does a clean stop. ``stop`` is set at once so the main loop ends
    after its current step; a step still running after :data:`LIFELINE_GRACE_S` (start-up scoring, a
    merge) is cut short: a killed merge loses nothing (see the module docstring).
    """
    def watch() -> None:
        while stream.read(65536):
            pass
        log.info("parent process gone: stopping")
        stop.set()
        time.sleep(LIFELINE_GRACE_S)
        os._exit(0)

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread


def run_worker(settings: ServerSettings, stop: threading.Event | None = None) -> None:
    """Poll for work until ``stop`` is set, reporting every step to this worker's heartbeat."""
    stop = stop or threading.Event()
    storage = Storage(settings)
    holder = new_holder()
    scorers = default_scorer_factory(settings)
    heartbeat = Heartbeat(settings, holder).start()
    backoff = FailureBackoff(first_s=5 * settings.poll_interval_s)
    log.info("merge worker %s started", holder)
    try:
        heartbeat.progress("scoring the active versions")
        try:
            warm_up(storage, scorers)
        except Exception:  # scoring is retried at the first merge; serving must not depend on it
            log.exception("validation warm-up failed")
        log.info("merge worker %s ready", holder)
        while not stop.is_set():
            heartbeat.progress("idle")
            try:
                run_once(storage, holder, scorers, heartbeat.progress, backoff)
            except Exception:  # keep serving other families; the failed batch stays buffered
                log.exception("merge worker iteration failed")
                stop.wait(5 * settings.poll_interval_s)
            stop.wait(settings.poll_interval_s)
    finally:
        heartbeat.close()
        storage.dispose()


def main(argv: list[str] | None = None) -> None:
    """``python -m dafne_server.worker [--lifeline]``: settings from ``DAFNE_SERVER_SETTINGS``;
    with ``--lifeline`` the process ends when its standard input closes (its supervisor is gone)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s merge-worker %(message)s")
    stop = threading.Event()
    if "--lifeline" in (sys.argv[1:] if argv is None else argv):
        # Its supervisor alone ends it (through the lifeline), not a Ctrl-C or SIGTERM sent to the
        # whole process group while the API shuts down: that would only make the supervisor restart it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        watch_lifeline(stop, sys.stdin.buffer)
    run_worker(ServerSettings.from_env(), stop)


if __name__ == "__main__":
    main()
