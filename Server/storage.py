"""Storage: database engine + migrations + blob folder, and the operations on families and versions.

Versions are immutable. Publishing writes the weights blob first (atomic, content-addressed) and
then, in one transaction, the version row, the active pointer and the audit entry: a crash at any
point leaves either no version or a complete one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from alembic import command
from alembic.config import Config
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dafne_logic.inference.manifest import Manifest, list_models
from dafne_logic.inference.model_package import ModelPackage, parse_weights, weights_bytes
from dafne_logic.learning.delta import weights_norm

from . import crud
from .blobs import BlobStore
from .config import ServerSettings, refuse_database_left_elsewhere
from .db import Family, MergeLease, Version, audit, make_engine, make_sessionmaker, now
from .private_files import write_durable

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
FAMILY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SERVER_WEIGHTS_DTYPE = torch.float32  # merged versions accumulate small deltas; fp16 would round them away


@dataclass(frozen=True)
class StoredWeights:
    """A weights blob already written: what a version row and its manifest record of it."""

    sha256: str
    size: int  # bytes
    tensors: dict[str, list[int]]  # name -> shape


def check_family_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name a model family (URL path segment, folder name)."""
    if not FAMILY_NAME.match(name):
        raise ValueError("family names are lower-case letters, digits, _ or -, at most 64")


def known_weights(version: Version) -> set[str]:
    """The sha256s a site may name as a version's weights: the server's float32 blob, and for a
    seeded version the file it was seeded from (e.g. the bundled fp16 package)."""
    seed = (version.manifest.get("provenance") or {}).get("seed_weights_sha256")
    return {version.weights_sha256} | ({seed} if seed else set())


class Storage:
    """One per process: engine, session factory and blob folder for ``settings``."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        refuse_database_left_elsewhere(settings)  # before SQLite makes a new, empty file (gc opens it directly)
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.url)
        self.session = make_sessionmaker(self.engine)  # transactions that write: ``with session.begin()``
        self.read_engine = make_engine(settings.url, for_writes=False) if settings.url.startswith("sqlite") \
            else self.engine
        self.read = make_sessionmaker(self.read_engine)  # read-only work: ``with read() as session``
        self.blobs = BlobStore(settings.blob_dir)
        self._norms: dict[str, float] = {}  # weights sha256 -> L2 norm; versions are immutable

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def collect_blobs(self, older_than_s: float = 3600.0, update_delta_days: float | None = None) -> int:
        """Remove blobs no version or update needs, written more than ``older_than_s`` ago (younger ones
        may belong to an upload whose row is about to be committed); with ``update_delta_days``, also the
        deltas of updates merged or rejected longer ago (None: every update's delta is kept). Returns how many.

        Nothing is collected from a database without a version: pointed at an empty or wrong database, a
        server must not take every blob for an orphan.
        """
        finished_before = None if update_delta_days is None else now() - update_delta_days * 86400.0
        with self.read() as session:
            if session.scalar(select(func.count()).select_from(Version)) == 0:
                return 0
            referenced = crud.referenced_blobs(session, finished_before=finished_before)
        if not self._blobs_belong_to_this_database():
            return 0
        return self.blobs.remove_unreferenced(referenced, older_than_s)

    def _blobs_belong_to_this_database(self) -> bool:
        """Whether the blob folder was collected against this ``--database-url`` before (or never was).

        A server started on a mistyped URL and then ``init``-ed has versions, but not the real database's:
        its collection would take the real versions' weights for orphans. The first collection records the
        URL (its password hidden) in ``blobs/.database``; another URL collects nothing, with a warning. The
        default SQLite database lives in the data folder with the blobs and needs no record.
        """
        if not self.settings.database_url:
            return True
        from sqlalchemy.engine import make_url

        identity = make_url(self.settings.database_url).render_as_string(hide_password=True)
        record = self.blobs.root / ".database"
        if not record.is_file():
            write_durable(record, identity.encode("utf-8"))
            return True
        if record.read_text(encoding="utf-8") == identity:
            return True
        log.warning("the blobs in %s were collected against another database (%s), not %s: nothing is collected. "
                    "If the database really moved, remove %s.", self.blobs.root,
                    record.read_text(encoding="utf-8"), identity, record)
        return False

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()

    # --- versions ----------------------------------------------------------------------------

    def load_package(self, version: Version) -> ModelPackage:
        """The version's manifest and weights, checked against its sha256, as float32 tensors."""
        manifest = Manifest.from_json(version.manifest, source=f"{version.family} v{version.number}")
        return ModelPackage(manifest, parse_weights(self.blobs.get(version.weights_sha256), manifest))

    def weights_norm(self, version: Version) -> float:
        """L2 norm of a version's weights (cached)."""
        if version.weights_sha256 not in self._norms:
            state = self.load_package(version).state_dict
            self._norms[version.weights_sha256] = weights_norm(state)
        return self._norms[version.weights_sha256]

    def store_weights(self, state_dict: dict[str, torch.Tensor]) -> StoredWeights:
        """Write the weights blob (durably: fsyncs). Call it before the transaction that names it: a
        write transaction holding SQLite's lock, or the family row on PostgreSQL, through the fsyncs
        would make every upload wait (and, past the busy timeout, fail)."""
        blob = weights_bytes(state_dict, SERVER_WEIGHTS_DTYPE)
        return StoredWeights(self.blobs.put(blob), len(blob), {k: list(v.shape) for k, v in state_dict.items()})

    def new_version(self, session: Session, family: Family, base: Manifest, state_dict: dict[str, torch.Tensor],
                    parent: int | None, source: str, validation: dict, provenance: dict,
                    number: int | None = None, stored: StoredWeights | None = None) -> Version:
        """Add version ``number`` (default ``max + 1``) of ``family``, make it active. Its weights are
        ``stored`` (from :meth:`store_weights`), or written here first when not given.

        The caller commits; until then nobody sees the version.
        """
        if number is None:
            number = (session.scalar(select(func.max(Version.number)).where(Version.family == family.name)) or 0) + 1
        manifest = Manifest.from_json(base.to_json())
        manifest.name = family.name  # clients' deltas name their family from the manifest
        manifest.version = str(number)
        manifest.parent_version = None if parent is None else str(parent)
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.provenance = {**manifest.provenance, **provenance}
        stored = stored or self.store_weights(state_dict)
        manifest.weights_sha256 = stored.sha256
        manifest.weights_dtype = str(SERVER_WEIGHTS_DTYPE).removeprefix("torch.")
        manifest.tensors = stored.tensors
        row = Version(family=family.name, number=number, parent_number=parent, manifest=manifest.to_json(),
                      weights_sha256=stored.sha256, weights_size=stored.size, source=source, validation=validation)
        session.add(row)
        family.active_version = number
        session.flush()
        return row

    def add_family(self, session: Session, name: str, package: ModelPackage, actor: str) -> Version:
        """Create family ``name`` seeded with ``package`` (the caller commits)."""
        check_family_name(name)
        if session.get(Family, name) is not None:
            raise ValueError(f"family {name!r} already exists")
        family = Family(name=name, region=package.manifest.region,
                        merge_settings=self.settings.default_merge_settings().to_json())
        session.add(family)
        session.add(MergeLease(family=name, holder=None, expires_at=0.0, force_requested=False))
        session.flush()
        # Keep the package's own version number when it has one, so that deltas made by sites
        # from the very same (e.g. bundled) model name a parent the server knows.
        seed_number = int(package.manifest.version) if package.manifest.version.isdigit() else 1
        version = self.new_version(session, family, package.manifest, package.state_dict, None, "seed", {},
                                   {"seeded_from": package.manifest.version,
                                    # the package file's own sha256 (sites that fine-tune the very same
                                    # package name it; the server's copy is re-encoded as float32)
                                    "seed_weights_sha256": package.manifest.weights_sha256 or None},
                                   number=seed_number)
        audit(session, actor, "family_created", name, version=version.number, region=family.region)
        return version

    def seed_bundled(self, actor: str = "cli") -> list[str]:
        """Create a family for every bundled model not yet on the server; returns the names added."""
        added = []
        with self.session.begin() as session:
            for entry in list_models(include_user=False):
                if session.get(Family, entry.name) is None:
                    self.add_family(session, entry.name, ModelPackage.load(entry.path), actor)
                    added.append(entry.name)
        return added

    def activate(self, session: Session, family: Family, number: int, actor: str) -> None:
        """Point ``family`` at an existing version (rollback or roll forward)."""
        if session.scalar(select(Version).where(Version.family == family.name, Version.number == number)) is None:
            raise LookupError(f"{family.name} has no version {number}")
        previous = family.active_version
        family.active_version = number
        audit(session, actor, "version_activated", family.name, version=number, previous=previous)
