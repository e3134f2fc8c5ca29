"""The MRML the glue tests run against is the one pyproject.toml pins (a newer slicer-core is a choice, not an accident)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")


def test_installed_slicer_core_is_the_pinned_version():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    pinned = re.search(r'"slicer-core==([\w.]+)"', pyproject).group(1)
    assert importlib.metadata.version("slicer-core") == pinned
