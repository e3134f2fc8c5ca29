"""Content-addressed blob folder: ``blobs/ab/abcdef…`` named by the sha256 of the bytes.

Writes are atomic (temporary file + rename), so a blob either exists complete or not at all; a
crash mid-write leaves at most a hidden temporary file that :meth:`BlobStore.sweep_temporaries`
removes. Writing the same bytes twice is a no-op. They are also durable and owner-only
(:func:`dafne_server.private_files.write_durable`): :meth:`BlobStore.put` returns only after the
bytes and the new name are on disk, so the upload that names the blob may be acknowledged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

from .private_files import fsync_directory, private_dir, write_durable

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data``; return its sha256 (hex)."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file():
            try:  # a blob orphaned long ago and stored again: fresh, so gc's age grace keeps it while its row commits
                os.utime(target)
                return digest
            except FileNotFoundError:  # gc removed it just now: write it again
                pass
        new_shard = not target.parent.is_dir()
        private_dir(self.root)
        write_durable(target, data)
        if new_shard:  # the shard folder's own name lives in the root folder
            fsync_directory(self.root)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def sweep_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by writes interrupted more than ``older_than_s`` ago."""
        removed = 0
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob("*/.*"):
            try:
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:  # another process's sweep or collection took it
                continue
            except PermissionError:  # Windows: held open by a virus scanner; the next start sweeps it
                log.warning("could not remove the temporary file %s yet (in use)", tmp)
        return removed

    def remove_unreferenced(self, referenced: set[str], older_than_s: float) -> int:
        """Remove blobs not in ``referenced`` and older than ``older_than_s``; returns how many.

        A concurrent :meth:`put` of the same bytes only refreshes the file's time, which a plain
        "stat, then unlink" would miss (the upload would commit a row naming a deleted blob). So a
        candidate is first renamed aside, then its time is read again: a ``put`` that came before the
        rename left it fresh and it goes back; one that comes after finds no file and writes it anew.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for blob in self.root.glob("??/*"):
            if not _SHA256.match(blob.name) or blob.name in referenced:
                continue
            # Hidden (sweep_temporaries removes one left by a crash) and this process's own: two
            # collections (run and a worker starting together) never take each other's.
            aside = blob.with_name(f".{blob.name}.{os.getpid()}.gc")
            try:
                if blob.stat().st_mtime >= cutoff:
                    continue
                os.replace(blob, aside)
                if aside.stat().st_mtime >= cutoff:  # stored again just before the rename: keep it
                    os.replace(aside, blob)
                    continue
            except FileNotFoundError:  # another collection or sweep took it: theirs to account for
                continue
            except PermissionError:  # Windows: a blob held open (being served, scanned) stays for the next run
                log.warning("could not collect the unreferenced blob %s yet (in use)", blob.name)
                continue
            try:
                aside.unlink(missing_ok=True)
            except PermissionError:  # hidden already; sweep_temporaries removes it later
                log.warning("could not remove %s yet (in use)", aside)
            removed += 1
        return removed
