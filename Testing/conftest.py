"""Shared pytest fixtures: deterministic CPU torch, the shared data folder, a private user data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DAFNE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path_factory, monkeypatch):
    """Never touch the real ~/.local/share/dafne-slicer from tests."""
    monkeypatch.setenv("DAFNE_SLICER_HOME", str(tmp_path_factory.mktemp("dafne_home")))


@pytest.fixture
def shared_data() -> Path:
    """The real data folder beside the project; tests needing it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/README.md)")
    return SHARED_DATA
