"""The upload service: check a delta upload completely, then buffer it, or refuse it with a reason.

Routers hand the raw form fields to :func:`receive_update` and turn :class:`UploadRefused` into
HTTP answers; every business rule of an upload lives here:

- the metadata is parsed by :meth:`DeltaMetadata.from_wire` (the format's one definition);
- the parent must be the active version or one of its last ``max_staleness`` ancestors (after a
  rollback, versions published later are not ancestors: their deltas would land on other weights);
- the delta is read in chunks and its safetensors header checked against the parent's manifest
  before the tensors are inflated, so an upload never costs more memory than the model's size;
- an idempotency key replayed with another body is a conflict (409), not a duplicate;
- the hourly limit of accepted uploads is checked in the transaction that inserts the update, under
  a per-user lock, so concurrent uploads cannot exceed it;
- :class:`UploadSlots` caps concurrent uploads in total and per user in each API process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, cast

from sqlalchemy.exc import IntegrityError

from dafne_logic.core.errors import ModelError
from dafne_logic.inference.manifest import Manifest
from dafne_logic.learning.delta import DeltaMetadata, decode_delta_stream, weights_norm

from . import crud
from .auth import Principal
from .db import UpdateRow, Version, audit
from .merging import MergeSettings
from .schemas import UpdateStatus
from .storage import Storage, known_weights

log = logging.getLogger(__name__)

HOUR_S = 3600.0
THROTTLED_AUDITS_PER_MINUTE = 10  # per user: enough to see a client that ignores 429s
_HASH_CHUNK = 1 << 20


class UploadRefused(Exception):
    """An upload the server will not take: ``status`` is the HTTP status, ``reason`` one sentence."""

    def __init__(self, status: int, reason: str, throttled: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.throttled = throttled  # a rate or concurrency limit, not a verdict on the upload


@dataclass(frozen=True)
class Receipt:
    id: str
    status: UpdateStatus
    duplicate: bool = False


class UploadSlots:
    """At most ``total`` uploads checked at once in this process, ``per_user`` of them per user."""

    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, user: str) -> Iterator[None]:
        """Hold one slot for ``user`` while the block runs; :class:`UploadRefused` (429) when none is free."""
        with self._lock:
            if self._busy[user] >= self.per_user:
                raise UploadRefused(429, f"at most {self.per_user} uploads at a time per user; retry when one "
                                         "has finished", throttled=True)
            if sum(self._busy.values()) >= self.total:
                raise UploadRefused(429, "the server is checking too many uploads; retry in a moment", throttled=True)
            self._busy[user] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[user] -= 1
                if not self._busy[user]:
                    del self._busy[user]


def check_refusal_budget(storage: Storage, who: Principal) -> None:
    """A user refused too often in the last hour is not checked again until the hour has passed:
    checking costs the server CPU."""
    limit = storage.settings.refused_uploads_per_hour
    with storage.read() as session:
        refused = crud.refusals_since(session, who.name, HOUR_S)
    if refused >= limit:
        raise UploadRefused(429, f"more than {limit} refused uploads in the last hour; fix the client and retry later",
                            throttled=True)


def record_refusal(storage: Storage, who: Principal, family: str, status: int, reason: str, throttled: bool) -> None:
    """Audit a refusal; throttled ones are kept apart so that they do not count towards the
    refused-upload limit (an honest client retrying under load must not lock itself out).

    Throttled refusals cost the client nothing, so a client ignoring 429s could grow the append-only
    audit log (and commit) at its request rate: at most :data:`THROTTLED_AUDITS_PER_MINUTE` a minute
    per user are audited, the rest only logged.
    """
    if throttled:
        _audit_capped(storage, who, family, crud.THROTTLED, status, reason)
    else:
        with storage.session.begin() as session:
            audit(session, who.name, crud.REFUSED, family, status=status, reason=reason[:300])


def record_failure(storage: Storage, who: Principal, family: str, status: int, exc: BaseException) -> None:
    """Audit an upload the server failed on. Apart from refusals: a full disk or a locked database
    must not use up an honest client's refused-upload budget (it retries 5xx); capped like throttled
    refusals, as such a client retries into a failing server. Never raises: the original error is
    what the caller reports."""
    try:
        _audit_capped(storage, who, family, crud.FAILED, status, f"unexpected {type(exc).__name__}")
    except Exception:  # the database may be what failed
        log.exception("could not audit the failed upload by %s to %s", who.name, family)


def _audit_capped(storage: Storage, who: Principal, family: str, action: str, status: int, reason: str) -> None:
    """Audit ``action`` unless :data:`THROTTLED_AUDITS_PER_MINUTE` of it were audited for this user in
    the last minute (then only logged)."""
    with storage.read() as session:
        if crud.refusals_since(session, who.name, 60.0, action) >= THROTTLED_AUDITS_PER_MINUTE:
            log.info("upload by %s: %s (%s) not audited: %d this minute already", who.name, action, status,
                     THROTTLED_AUDITS_PER_MINUTE)
            return
    with storage.session.begin() as session:
        audit(session, who.name, action, family, status=status, reason=reason[:300])


def _same_upload(row: UpdateRow, family: str, meta: DeltaMetadata, blob_sha256: str) -> bool:
    return (row.family, row.parent_version, row.n_slices, row.client_dice, row.client_version, row.blob_sha256) == \
        (family, int(meta.parent_version), meta.n_slices, meta.dice_per_label, meta.client_version, blob_sha256)


def _sha256_stream(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(_HASH_CHUNK), b""):
        digest.update(block)
    stream.seek(0)
    return digest.hexdigest()


def _replay(row: UpdateRow, family: str, meta: DeltaMetadata, delta: IO[bytes]) -> Receipt:
    """A repeated idempotency key: the same upload again (harmless), or another one (409)."""
    if not _same_upload(row, family, meta, _sha256_stream(delta)):
        raise UploadRefused(409, "this idempotency key was already used for a different upload; "
                                 "a new upload needs a new key")
    return Receipt(row.id, cast(UpdateStatus, row.status), duplicate=True)


def _staleness(session, family: str, active: Version, parent: Version, max_staleness: int) -> int:  # noqa: ANN001
    steps = crud.ancestry(session, active, max_staleness).get(parent.number)
    if steps is not None:
        return steps
    if parent.number in crud.ancestry(session, active, max(parent.number, active.number)):
        raise UploadRefused(409, f"parent version {parent.number} is more than {max_staleness} versions behind the "
                                 f"active {active.number}; pull the new version and fine-tune again")
    raise UploadRefused(409, f"parent version {parent.number} of {family} is not in the history of the active "
                             f"version {active.number} (it was rolled back or replaced); pull version "
                             f"{active.number} and fine-tune again")


def receive_update(storage: Storage, family: str, metadata_text: str, delta: IO[bytes], who: Principal) -> Receipt:
    """Check an upload completely and buffer it; :class:`UploadRefused` says why not.

    ``delta`` is a binary file positioned at the compressed delta (read in chunks, never whole).
    """
    settings = storage.settings
    try:
        meta, key = DeltaMetadata.from_wire(metadata_text)
    except ValueError as exc:
        raise UploadRefused(422, str(exc)) from None
    if meta.family and meta.family != family:
        raise UploadRefused(422, f"metadata names family {meta.family!r} but the upload is for {family!r}")
    size = delta.seek(0, io.SEEK_END)
    delta.seek(0)
    if size > settings.max_upload_bytes:
        raise UploadRefused(413, f"the delta is larger than {settings.max_upload_bytes} bytes")
    with storage.read() as session:
        fam = crud.get_family(session, family)
        existing = crud.update_by_key(session, who.user_id, key)
        if existing is not None:
            return _replay(existing, family, meta, delta)
        if crud.updates_since(session, who.user_id, HOUR_S) >= settings.uploads_per_hour:
            raise UploadRefused(429, f"at most {settings.uploads_per_hour} uploads per hour per user", throttled=True)
        parent = crud.find_version(session, family, int(meta.parent_version))
        if parent is None:
            raise UploadRefused(422, f"parent version {meta.parent_version} of {family} is unknown")
        if meta.parent_sha256 and meta.parent_sha256 not in known_weights(parent):
            raise UploadRefused(409, f"the delta was made against other weights than version {parent.number} of "
                                     f"{family} on this server; pull version {parent.number} (or the active one) "
                                     "and fine-tune again")
        active = crud.get_version(session, fam, "active")
        max_staleness = MergeSettings.from_json(fam.merge_settings).max_staleness
        _staleness(session, family, active, parent, max_staleness)
    try:
        decoded, blob = decode_delta_stream(delta, Manifest.from_json(parent.manifest), settings.max_delta_bytes)
    except ModelError as exc:
        raise UploadRefused(422, str(exc)) from None
    norm = weights_norm(decoded)
    bound = settings.max_relative_norm * storage.weights_norm(active)
    if norm > bound:
        raise UploadRefused(422, f"update norm {norm:.3g} exceeds the bound {bound:.3g} "
                                 f"({settings.max_relative_norm} × the active weights' norm)")
    sha = storage.blobs.put(blob)  # before the row: a crash leaves an unreferenced blob, collected later
    row = UpdateRow(id=uuid.uuid4().hex, family=family, user_id=who.user_id, idempotency_key=key,
                    parent_version=parent.number, n_slices=meta.n_slices, client_dice=meta.dice_per_label,
                    client_version=meta.client_version, blob_sha256=sha, blob_size=len(blob), norm=norm,
                    status="buffered", reason="")
    try:
        with storage.session.begin() as session:
            crud.lock_user(session, who.user_id)
            if crud.updates_since(session, who.user_id, HOUR_S) >= settings.uploads_per_hour:
                raise UploadRefused(429, f"at most {settings.uploads_per_hour} uploads per hour per user", throttled=True)
            fam = crud.get_family(session, family)  # an admin may have rolled back meanwhile
            _staleness(session, family, crud.get_version(session, fam, "active"), parent, max_staleness)
            session.add(row)
            audit(session, who.name, "update_received", family, update=row.id, parent=parent.number,
                  bytes=len(blob), norm=round(norm, 6), n_slices=meta.n_slices)
    except IntegrityError:  # the same idempotency key raced in from a retry
        with storage.read() as session:
            existing = crud.update_by_key(session, who.user_id, key)
        if existing is None:
            raise
        delta.seek(0)
        return _replay(existing, family, meta, delta)
    return Receipt(row.id, "buffered")
