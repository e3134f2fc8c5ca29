"""Database tables (SQLAlchemy 2 ORM) and engine set-up; the schema itself is created by Alembic.

Times are stored as float seconds since the epoch (UTC): the same on SQLite and PostgreSQL, and
cheap to compare in the atomic lease claim.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from dafne_logic.core.errors import DafneError

MAX_INTEGER = 2**31 - 1  # INTEGER columns (ids, version numbers) are 32-bit on PostgreSQL


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Token(Base):
    """A bearer token ``dft_<id>_<secret>``; only sha256(secret) is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))  # "contributor" or "admin"
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Family(Base):
    __tablename__ = "families"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    region: Mapped[str] = mapped_column(String(32))
    active_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    merge_settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Version(Base):
    """An immutable published model: manifest JSON + weights blob (sha256 = blob key)."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("family", "number", name="uq_versions_family_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(ForeignKey("families.name"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    parent_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_size: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(16))  # "seed", "merge", "admin"
    validation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {"dice": {label: d}, "mean": m}
    created_at: Mapped[float] = mapped_column(Float, default=now)


class UpdateRow(Base):
    """One uploaded delta and what became of it."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key", name="uq_updates_user_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    family: Mapped[str] = mapped_column(ForeignKey("families.name"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    parent_version: Mapped[int] = mapped_column(Integer)
    n_slices: Mapped[int] = mapped_column(Integer)
    client_dice: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    client_version: Mapped[str] = mapped_column(String(64), default="")
    blob_sha256: Mapped[str] = mapped_column(String(64))
    blob_size: Mapped[int] = mapped_column(BigInteger)
    norm: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), index=True)  # buffered, merged, rejected
    reason: Mapped[str] = mapped_column(Text, default="")
    merged_into: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class MergeLease(Base):
    """At most one merge per family: claimed by an atomic conditional UPDATE (see worker)."""

    __tablename__ = "merge_leases"
    family: Mapped[str] = mapped_column(ForeignKey("families.name"), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    force_requested: Mapped[bool] = mapped_column(Boolean, default=False)


class MergeRun(Base):
    __tablename__ = "merge_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(ForeignKey("families.name"), index=True)
    started_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float] = mapped_column(Float, default=now)
    outcome: Mapped[str] = mapped_column(String(16))  # "published", "rejected", "abandoned" or "failed"
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    update_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AuditEntry(Base):
    """Append-only: the migration installs triggers that refuse UPDATE and DELETE."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, default=now, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    family: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def make_engine(url: str, for_writes: bool = True) -> Engine:
    """Engine for ``url``; SQLite gets WAL with synchronous=FULL, a busy timeout and foreign keys.

    On SQLite, transactions of a ``for_writes`` engine start with ``BEGIN IMMEDIATE`` (see below);
    a read engine keeps deferred transactions, which under WAL read a snapshot without locking.
    """
    if url.startswith("sqlite"):
        engine = _create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API connection
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns (NORMAL may lose the last commits on a
            # power cut), so an upload is acknowledged only once it is durable.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:  # noqa: ANN001
            # Writers take the write lock at BEGIN: a deferred transaction that reads and then
            # writes fails at once (SQLITE_BUSY) when another process wrote in between, no retry.
            connection.exec_driver_sql("BEGIN IMMEDIATE" if for_writes else "BEGIN")

        return engine
    return _create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _create_engine(url: str, **options: Any) -> Engine:
    """``create_engine``, with a URL it cannot use (``--database-url``) refused in one sentence."""
    try:
        return create_engine(url, **options)
    except (ArgumentError, NoSuchModuleError) as exc:  # the URL itself may hold a password: not echoed
        raise DafneError(f"the database URL is not one SQLAlchemy can use: {str(exc).splitlines()[0]}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def audit(session, actor: str, action: str, family: str | None = None, **detail: Any) -> None:  # noqa: ANN001
    """Add an audit entry to the session's transaction (committed with the change it records)."""
    session.add(AuditEntry(actor=actor, action=action, family=family, detail=detail))
