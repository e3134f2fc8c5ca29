"""Where DafneSlicer keeps per-user files. No heavy imports: the Slicer panel reads these before
torch is installed."""

from __future__ import annotations

import os
from pathlib import Path


def user_data_dir() -> Path:
    """User models, pulled versions and settings (``$DAFNE_SLICER_HOME`` overrides)."""
    home = os.environ.get("DAFNE_SLICER_HOME")
    if home:
        return Path(home)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dafne-slicer"


def user_models_dir() -> Path:
    return user_data_dir() / "models"
