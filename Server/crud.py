"""Database reads and writes of the routers (FastAPI full-stack template's ``crud`` layer).

Routers call these instead of running queries inline, and never import lookups from each other.
Missing rows raise :class:`NotFound`, which the application answers with 404.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from .db import AuditEntry, Family, MergeLease, MergeRun, Token, UpdateRow, User, Version, now
from .schemas import FamilyInfo, VersionInfo

REFUSED = "update_refused"  # audit action of an upload refused after being checked
THROTTLED = "update_throttled"  # audit action of an upload refused by a rate or concurrency limit
FAILED = "update_failed"  # audit action of an upload the server failed on (5xx): not the client's refusal


class NotFound(LookupError):
    """A family, version or update that does not exist (HTTP 404); the message says which."""


def get_family(session: Session, name: str, for_update: bool = False) -> Family:
    """The family ``name`` (404 when unknown); ``for_update`` locks its row until the transaction ends
    (PostgreSQL; SQLite's write transactions are serial already), for a read-modify-write."""
    family = session.get(Family, name, with_for_update=for_update)
    if family is None:
        raise NotFound(f"no model family {name!r}")
    return family


def find_version(session: Session, family: str, number: int | None) -> Version | None:
    if number is None:
        return None
    return session.scalar(select(Version).where(Version.family == family, Version.number == number))


def get_version(session: Session, family: Family, ref: str) -> Version:
    """Version ``ref`` (a number, or ``"active"``) of ``family``."""
    version = find_version(session, family.name, family.active_version if ref == "active" else int(ref))
    if version is None:
        raise NotFound(f"{family.name} has no version {ref}")
    return version


def ancestry(session: Session, version: Version, max_steps: int) -> dict[int, int]:
    """``{version number: steps back}`` for ``version`` and its ancestors, at most ``max_steps`` back.

    A delta may only be applied along this line: after a rollback, versions published after the
    re-activated one are not in it (a delta against them would land on other weights).
    """
    # One query for the family's (number, parent) pairs, walked in memory: an upload naming an old
    # parent made one query per version, each loading a manifest.
    parent_of = dict(session.execute(select(Version.number, Version.parent_number)
                                     .where(Version.family == version.family)).tuples().all())
    line = {version.number: 0}
    number = version.number
    for steps in range(1, max_steps + 1):
        parent = parent_of.get(number)
        if parent is None or parent not in parent_of or parent in line:
            break
        line[parent], number = steps, parent
    return line


def families(session: Session) -> list[Family]:
    return list(session.scalars(select(Family).order_by(Family.name)))


def versions(session: Session, family: str, limit: int | None = None, before: int | None = None) -> list[Version]:
    """The newest ``limit`` versions (all: None) numbered below ``before`` (any: None), oldest first.

    Manifests (about 16 KB each) are not loaded: a family merging for months has thousands of
    versions, and lists show numbers, sources and scores only."""
    query = select(Version).options(defer(Version.manifest)).where(Version.family == family)
    if before is not None:
        query = query.where(Version.number < before)
    newest = list(session.scalars(query.order_by(Version.number.desc()).limit(limit)))
    return newest[::-1]


def version_info(version: Version, family: Family) -> VersionInfo:
    return VersionInfo(family=version.family, number=version.number, parent=version.parent_number,
                       source=version.source, created_at=version.created_at,
                       weights_sha256=version.weights_sha256, weights_size=version.weights_size,
                       validation_mean_dice=version.validation.get("mean"),
                       active=version.number == family.active_version)


def family_info(session: Session, family: Family) -> FamilyInfo:
    active = get_version(session, family, "active") if family.active_version is not None else None
    labels = [m["name"] for m in active.manifest.get("labels", {}).get("muscles", [])] if active else []
    buffered = session.scalar(select(func.count()).select_from(UpdateRow).where(
        UpdateRow.family == family.name, UpdateRow.status == "buffered"))
    return FamilyInfo(name=family.name, region=family.region, active_version=family.active_version,
                      labels=labels, buffered_updates=buffered or 0)


# --- updates --------------------------------------------------------------------------------------

def refusals_since(session: Session, actor: str, seconds: float, action: str = REFUSED) -> int:
    """Uploads by ``actor`` refused after checking (or throttled, or failed: ``action``) in the last ``seconds``."""
    return session.scalar(select(func.count()).select_from(AuditEntry).where(
        AuditEntry.actor == actor, AuditEntry.action == action, AuditEntry.at > now() - seconds)) or 0


def updates_since(session: Session, user_id: int, seconds: float) -> int:
    """Uploads by ``user_id`` accepted in the last ``seconds``."""
    return session.scalar(select(func.count()).select_from(UpdateRow).where(
        UpdateRow.user_id == user_id, UpdateRow.created_at > now() - seconds)) or 0


def update_by_key(session: Session, user_id: int, idempotency_key: str) -> UpdateRow | None:
    return session.scalar(select(UpdateRow).where(UpdateRow.user_id == user_id,
                                                  UpdateRow.idempotency_key == idempotency_key))


def lock_user(session: Session, user_id: int) -> None:
    """Serialise this user's writing transactions until the caller's transaction ends.

    PostgreSQL: a row lock on the user. SQLite has no row locks (SQLAlchemy leaves ``FOR UPDATE``
    out) but needs none: its writing transactions start with ``BEGIN IMMEDIATE`` (see db.py).
    """
    session.scalar(select(User.id).where(User.id == user_id).with_for_update())


def request_merge(session: Session, family: str) -> None:
    """Ask the merge worker to merge what ``family`` has buffered, even fewer than K updates."""
    get_family(session, family)
    lease = session.get(MergeLease, family)
    assert lease is not None, "every family gets its lease row when it is created"
    lease.force_requested = True


# --- users and the audit log ----------------------------------------------------------------------

def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def users_with_tokens(session: Session) -> list[tuple[User, list[Token]]]:
    return [(user, list(session.scalars(select(Token).where(Token.user_id == user.id).order_by(Token.id))))
            for user in session.scalars(select(User).order_by(User.name))]


def audit_entries(session: Session, after_id: int, limit: int) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).where(AuditEntry.id > after_id).order_by(AuditEntry.id).limit(limit)))


def count_updates(session: Session, user_id: int) -> int:
    return session.scalar(select(func.count()).select_from(UpdateRow).where(UpdateRow.user_id == user_id)) or 0


def referenced_blobs(session: Session, finished_before: float | None = None) -> set[str]:
    """sha256 of every blob still needed: versions' weights and updates' deltas, apart from those of
    updates merged or rejected before ``finished_before`` (a time; None keeps every delta).

    Such an update keeps its row (who sent what, its norm, its fate); only its delta can go.
    """
    deltas = select(UpdateRow.blob_sha256)
    if finished_before is not None:
        deltas = deltas.where((UpdateRow.status == "buffered") | (UpdateRow.updated_at >= finished_before))
    return set(session.scalars(select(Version.weights_sha256))) | set(session.scalars(deltas))


def update_status_counts(session: Session, family: str) -> dict[str, int]:
    """How many of ``family``'s updates are in each status (statuses without one are absent)."""
    rows = session.execute(select(UpdateRow.status, func.count()).where(UpdateRow.family == family)
                           .group_by(UpdateRow.status))
    return {status: int(n) for status, n in rows}


def recent_merge_runs(session: Session, family: str, limit: int = 10) -> list[MergeRun]:
    """``family``'s latest merge runs, newest first."""
    return list(session.scalars(select(MergeRun).where(MergeRun.family == family)
                                .order_by(MergeRun.id.desc()).limit(limit)))
