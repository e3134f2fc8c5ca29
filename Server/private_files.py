"""Owner-only, durable files of the server's data folder (client deltas are other people's data).

On POSIX the data folder and every folder under it are 0700 and every file 0600; writes are
fsynced, and so is the folder that receives a new name, so a file that was acknowledged survives
a power cut. Windows has no POSIX modes (``os.chmod`` only toggles read-only) and cannot open a
folder to fsync it: there the data folder inherits its ACL from where the operator puts it (keep
it under the service account's profile) and NTFS journals the rename itself.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dafne_logic.core.atomic import open_unique_file, replace_file

POSIX = os.name == "posix"  # module constant, so tests can take the Windows path on any system
DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed; make it owner-only. Returns it as a Path."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if POSIX:
        os.chmod(path, DIR_MODE)  # an existing folder too (mkdir's mode also passes through the umask)
    return path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make new names in ``path`` durable (POSIX only; see the module docstring for Windows)."""
    if not POSIX:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (temporary file + rename) and durably, owner-only.

    The temporary file is hidden (``.name``) beside the target, created 0600 and kept open by
    :func:`dafne_logic.core.atomic.open_unique_file` (not ``tempfile.mkstemp``, which on Windows retries
    a folder whose access list denies new files 2**31 times instead of failing).
    """
    target = Path(target)
    folder = private_dir(target.parent)
    fd, tmp = open_unique_file(folder, ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_file(tmp, target)  # on Windows, a target a virus scanner holds a moment is retried
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(folder)


def make_private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty if missing (so later writers keep its mode) and make it owner-only."""
    path = Path(path)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | getattr(os, "O_BINARY", 0), FILE_MODE))
    if POSIX:
        os.chmod(path, FILE_MODE)


def tighten_tree(root: str | os.PathLike[str]) -> None:
    """Make every folder and file under ``root`` owner-only (data folders made by older versions).

    A live server may rename or remove files meanwhile (an upload's temporary blob, a collected
    one): those are skipped, so that ``add-user`` or ``revoke`` beside a busy server does not fail.
    """
    if not POSIX:
        return
    for folder, _dirs, files in os.walk(root):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(folder, DIR_MODE)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, FILE_MODE)
