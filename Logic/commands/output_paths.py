"""Output files of a command, checked before any work, so a bad combination writes nothing.

A command that writes several files (``stats --csv --csa``; ``segment -o --stats --csa --preview``)
must not write two of them to one path (the later would silently replace the earlier), replace one
of its own inputs, or find a folder where it is to write a file, or a folder it cannot write in,
after the first files are written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from dafne_logic.core import atomic
from dafne_logic.core.errors import InputError
from dafne_logic.core.paths import same_location

PathLike = str | os.PathLike[str]


def _key(path: PathLike) -> str:
    """One spelling per file: absolute, links resolved, case folded where the file system folds it."""
    return os.path.normcase(str(Path(path).resolve()))


def _same_existing_file(path: Path, others: list[Path]) -> bool:
    """Whether ``path`` exists and is one of ``others`` under another spelling (hard link; a
    case-insensitive disk, as macOS's usually are, where ``normcase`` folds nothing)."""
    return path.is_file() and any(same_location(path, other) for other in others)


def check_outputs(outputs: Sequence[tuple[str, PathLike | None]], inputs: Iterable[PathLike | None]) -> None:
    """Raise :class:`InputError` (one sentence) unless every output is its own file and no input.

    Args:
        outputs: (option, path) per file to be written, e.g. ``("--csv", "stats.csv")``; None is skipped.
            An option may appear several times (``-o`` with several inputs).
        inputs: every file or folder the command reads (images, segmentations, maps); None is skipped.
    """
    read = [Path(p) for p in inputs if p is not None]
    read_keys = {_key(p) for p in read}
    seen: dict[str, str] = {}
    # Files not yet written cannot be compared with samefile: outputs whose names differ only in
    # letter case are refused everywhere, as macOS's and Windows's disks usually take them for one.
    by_folded: dict[str, tuple[str, PathLike]] = {}
    for option, path in outputs:
        if path is None:
            continue
        if Path(path).is_dir():
            raise InputError(f"{option} {path} is a folder; give a file name.")
        _check_folder_can_exist(option, Path(path))
        key = _key(path)
        if key in read_keys or _same_existing_file(Path(path), read):
            raise InputError(f"{option} {path} would overwrite one of this command's inputs; choose another file.")
        folder = next((p for p in read if p.is_dir() and _key(Path(path).parent) == _key(p)), None)
        if folder is not None:  # a DICOM series folder: the output could replace a slice, or join the series
            raise InputError(f"{option} {path} lies in the input folder {folder}; write outputs beside it, not in it.")
        if key in seen and seen[key] != option:
            raise InputError(f"{seen[key]} and {option} both name {path}; give each output its own file.")
        if key in seen:
            raise InputError(f"{option} would write {path} twice; give each output its own file.")
        other = by_folded.get(key.casefold())
        if other is not None:
            raise InputError(f"{other[0]} {other[1]} and {option} {path} differ only in letter case, which most macOS "
                             "and Windows disks take for one file; give each output its own name.")
        seen[key] = option
        by_folded[key.casefold()] = (option, path)
        _check_not_held_open(option, Path(path))


def _check_folder_can_exist(option: str, path: Path) -> None:
    """Refuse an output whose folder cannot be made because a file stands where a folder would be
    (``--csa notes.txt/areas.csv``), or that cannot be written in (read-only, a system folder):
    found after the first outputs were written, it would leave them. The nearest existing folder is
    asked by making and removing an empty file in it (a folder, where the output's folder is still to
    be made: Windows grants the two separately), which answers on every platform where permission
    bits do not (access lists on Windows; root on POSIX). A full disk still shows only when writing."""
    for folder in path.absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"{option} {path} cannot be written: {folder} is a file, not a folder.")
            makes_folder = folder != path.absolute().parent
            try:
                probe = (atomic.unique_folder if makes_folder else atomic.unique_file)(folder, ".dafne-write-check-")
            except OSError as exc:
                raise InputError(f"{option} {path} cannot be written: {folder} does not take new "
                                 f"{'folders' if makes_folder else 'files'} ({exc.strerror or exc}).") from None
            try:  # a virus scanner or cloud sync may hold the new file a moment: the check has answered
                if makes_folder:
                    probe.rmdir()
                else:
                    probe.unlink()
            except OSError:
                pass
            return


def _check_not_held_open(option: str, path: Path) -> None:
    """Refuse, before any work, an existing output another program holds open: on Windows (Excel with
    a CSV open) the final rename would fail after every case was computed. Opening it for appending
    writes nothing and fails the same way. Elsewhere a rename replaces even a read-only file: no check."""
    if not atomic.WINDOWS or not path.is_file():
        return
    try:
        with path.open("ab"):
            pass
    except PermissionError:
        raise InputError(f"{option} {path} cannot be replaced: it is read-only or open in another program "
                         "(close it there, then try again).") from None
