"""Atomic file and folder writes: a failed or interrupted run leaves no partial output behind.

Portable to every platform Slicer runs on: permissions are set by path (``os.chmod``), never by file
descriptor, because Windows Python before 3.13 (Slicer 5.10 ships 3.12) has no ``os.fchmod``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

# Windows refuses to rename onto a file another program holds open (Excel keeps a CSV open; virus
# scanners and cloud sync hold new files for a moment): retried for about this long, then explained.
WINDOWS = os.name == "nt"
REPLACE_RETRY_S = 2.0


def replace_file(source: Path, target: Path, retry_s: float | None = None) -> None:
    """``os.replace(source, target)``; on Windows, a refusal because something is held open elsewhere
    (the target file, or a file inside a folder being moved) is retried for ``retry_s`` (default
    :data:`REPLACE_RETRY_S`), then reported as such (PermissionError naming ``target``)."""
    deadline = time.monotonic() + (REPLACE_RETRY_S if retry_s is None else retry_s)
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as exc:
            if not WINDOWS or target.is_dir():
                raise
            if time.monotonic() >= deadline:
                raise PermissionError(errno.EACCES, "in use by another program (close it there, then try again)",
                                      str(target)) from exc
            time.sleep(0.1)


UNIQUE_NAME_TRIES = 100  # random 12-hex-digit names: a clash is already rare, a hundred impossible


def unique_file(folder: Path, prefix: str, suffix: str = "") -> Path:
    """Create a new empty file ``prefix + random + suffix`` in ``folder`` (mode 0600) and return its path.

    What :func:`tempfile.mkstemp` does, without its Windows trap: there a PermissionError is taken
    for a folder of the chosen name and retried while ``os.access`` calls the folder writable, which
    on Windows reads only the read-only flag; a folder whose access list denies new files is then
    retried 2**31 times on Python 3.12 (CPython gh-66305) instead of refused. Here only a name
    already taken is retried; a denial is raised at once.
    """
    handle, path = open_unique_file(folder, prefix, suffix)
    os.close(handle)
    return path


def open_unique_file(folder: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """:func:`unique_file`, kept open: (file descriptor for writing, path). Writing through it leaves no
    moment in which another program (a virus scanner, cloud sync on Windows) could take the new file."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_BINARY", 0)
    opened: list[int] = []
    path = _unique(folder, prefix, suffix, lambda candidate: opened.append(os.open(candidate, flags, 0o600)))
    return opened[0], path


def unique_folder(folder: Path, prefix: str) -> Path:
    """Create a new empty folder ``prefix + random`` in ``folder`` (mode 0700), as :func:`unique_file`."""
    return _unique(folder, prefix, "", lambda path: os.mkdir(path, 0o700))


def _unique(folder: Path, prefix: str, suffix: str, create) -> Path:
    for _ in range(UNIQUE_NAME_TRIES):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(path)
            return path
        except FileExistsError:
            continue
        except PermissionError:
            if WINDOWS and path.exists():  # how Windows answers a name taken by a folder
                continue
            raise
    raise FileExistsError(errno.EEXIST, "no unused name found", str(folder))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], owner_only: bool = False,
                replace_retry_s: float | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.seg.nrrd``), in lower case, so
    writers that pick a format from the extension still do (ITK knows ``.mha``, not ``.MHA``). On any exception the temporary file is removed and
    ``target`` is untouched. ``owner_only``: keep the file readable by its owner only from its
    creation on (mode 0600 on POSIX; on Windows, where modes only toggle read-only, the file
    inherits the access list of its folder, which in the user's application data folder is the
    user's own).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes).lower() or ".tmp"
    with _naming(target):
        tmp = unique_file(target.parent, f".{target.name.split('.')[0]}-", suffix)
    if not owner_only:  # created 0600; outputs get the permissions a plain open() would give
        os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        with _naming(target, tmp):  # a full disk while writing, a folder in the way when renaming
            yield tmp
            replace_file(tmp, target, replace_retry_s)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _naming(target: Path, temporary: Path | None = None) -> Iterator[None]:
    """Re-raise an OSError about our temporary file (``temporary``; None: any) as one about ``target``.

    The user named ``target`` and never saw the temporary name; errors about other files pass as they are.
    """
    try:
        yield
    except OSError as exc:
        if temporary is not None and str(temporary) not in (exc.filename, exc.filename2):
            raise
        raise OSError(exc.errno, exc.strerror, str(target)) from exc  # errno picks the subclass (IsADirectoryError …)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, replace_retry_s: float | None = None) -> None:
    with atomic_path(target, replace_retry_s=replace_retry_s) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str, replace_retry_s: float | None = None) -> None:
    """``text`` as UTF-8; ``replace_retry_s``: see :func:`replace_file`."""
    atomic_write_bytes(target, text.encode("utf-8"), replace_retry_s)


# What file browsers leave in a folder the user made (Finder, Explorer): such a folder is still empty. Not
# desktop.ini or .localized: they mark the system's own folders (Downloads, Documents), never to be replaced.
SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db"})


def check_replaceable(target: str | os.PathLike[str], marker: str, what: str) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty folder, or a folder holding ``marker``
    (what an earlier write of the same kind left: ``manifest.json`` for a model package).

    An output path that names the user's case folder, a folder of scans or a segmentation file is
    refused, never replaced.

    Raises:
        FileExistsError: naming ``target`` and ``what`` it should be.
    """
    target = Path(target)
    if not target.exists():
        return
    if target.is_dir() and ((target / marker).is_file() or all(p.name in SYSTEM_FILES for p in target.iterdir())):
        return
    kind = "a folder" if target.is_dir() else "a file"
    raise FileExistsError(errno.EEXIST, f"already exists and is {kind}, not {what}: choose another name "
                                        "(nothing is replaced but an earlier output of the same kind)", str(target))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, marker: str, what: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` must be an earlier output of the same kind (see :func:`check_replaceable`:
    ``marker`` and ``what``), checked before anything is written; it is only removed after the new
    folder is complete, and put back when the new one cannot take its place.
    """
    target = Path(target)
    check_replaceable(target, marker, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _naming(target):
        tmp = unique_folder(target.parent, f".{target.name}-")
    tmp.chmod(0o777 & ~_current_umask())  # made 0700
    try:
        yield tmp
        with _naming(target):  # the renames only: errors in the caller's writes name the caller's files
            if target.exists():
                check_replaceable(target, marker, what)  # made meanwhile by someone else
                old = unique_folder(target.parent, f".{target.name}-old-")
                # Folders onto free names: replace_file's Windows retry covers a file inside held by a scanner.
                replace_file(target, old / "x")
                try:
                    replace_file(tmp, target)
                except BaseException:
                    replace_file(old / "x", target)  # the earlier output stays where it was
                    shutil.rmtree(old, ignore_errors=True)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                replace_file(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
