"""Where DafneSlicer keeps per-user files. No heavy imports: the Slicer panel reads these before
torch is installed.

The folder is each platform's usual place for an application's data (what ``platformdirs``
returns for ``user_data_dir("dafne-slicer")``, written out here because it must work before any
package is installed):

- Linux and other POSIX: ``$XDG_DATA_HOME/dafne-slicer``, by default ``~/.local/share/dafne-slicer``
- macOS: ``~/Library/Application Support/dafne-slicer``
- Windows: ``%LOCALAPPDATA%\\dafne-slicer`` (local, not roaming: models are megabytes; the folder's
  access list admits only the user)

``$DAFNE_SLICER_HOME`` overrides it. Earlier versions used ``~/.local/share/dafne-slicer`` on every
platform; on macOS and Windows that folder is moved to the new place once, the first time the data
folder is asked for, unless the new place already exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

APP_NAME = "dafne-slicer"

log = logging.getLogger(__name__)


def platform_data_dir(platform: str, environ: Mapping[str, str], home: Path) -> Path:
    """The platform's user data folder of DafneSlicer (``platform``: a ``sys.platform`` value)."""
    if platform == "win32":
        local = environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(local) / APP_NAME
    if platform == "darwin":
        return home / "Library" / "Application Support" / APP_NAME
    return Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share") / APP_NAME


def legacy_data_dir(home: Path) -> Path:
    """Where versions before the platform folders kept the data, on every platform."""
    return home / ".local" / "share" / APP_NAME


def move_legacy_data(legacy: Path, target: Path) -> bool:
    """Move ``legacy`` to ``target`` if only the former exists; True if it was moved.

    A rename when both lie on one file system (atomic: another process sees either folder, never
    half of each); otherwise a copy then removal. A failure is logged and leaves the old folder as it
    was (the data are not lost, only not found until moved by hand).
    """
    if legacy == target or not legacy.is_dir() or target.exists():
        return False
    # Into a sibling first, renamed into place once complete: a copy across file systems that fails
    # half-way must not leave a partial folder at ``target``, which would hide the old one for good.
    staging = target.with_name(f".{target.name}.moving-{os.getpid()}")  # two processes migrating at once: one each
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(legacy, target)  # one file system: atomic
        except OSError as exc:
            if not legacy.is_dir():
                raise FileNotFoundError(legacy) from exc  # another process moved it first
            shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt that failed half-way
            try:
                shutil.copytree(legacy, staging, symlinks=True)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # the original is untouched
                raise
            try:
                os.replace(staging, target)
            except OSError:  # the other process put its copy in place first
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(legacy, ignore_errors=True)  # the copy is in place; a leftover original only costs space
    except FileNotFoundError:  # another process moved it first
        return False
    except OSError as exc:
        log.warning("Could not move DafneSlicer's data from %s to %s (%s); move it by hand.", legacy, target, exc)
        return False
    log.info("Moved DafneSlicer's data from %s to %s.", legacy, target)
    return True


def user_data_dir() -> Path:
    """User models, pulled versions and settings (``$DAFNE_SLICER_HOME`` overrides)."""
    override = os.environ.get("DAFNE_SLICER_HOME")
    if override:
        return Path(override)
    home = Path.home()
    target = platform_data_dir(sys.platform, os.environ, home)
    if sys.platform in ("win32", "darwin"):  # on Linux the old place was already the XDG one
        move_legacy_data(legacy_data_dir(home), target)
    return target


def user_models_dir() -> Path:
    return user_data_dir() / "models"


def same_location(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file or folder: the same once resolved, or (both existing) the same
    on disk. The second catches spellings differing in letter case on macOS's and Windows's
    case-insensitive disks, which ``resolve()`` leaves as typed on macOS."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist: not the same
        return False
