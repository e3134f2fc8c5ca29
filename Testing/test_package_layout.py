"""The folder rules of ``dafne_logic``: ``core/`` loads without torch, and nothing in ``Logic/`` imports
the server, Slicer, Qt or VTK (the extension installs ``dafne_logic`` into Slicer, never the server)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LOGIC = Path(__file__).resolve().parents[1] / "Logic"
CORE_MODULES = sorted(f"dafne_logic.core.{p.stem}" for p in (LOGIC / "core").glob("*.py") if p.stem != "__init__")
FORBIDDEN = {"dafne_server", "slicer", "qt", "ctk", "vtk", "mrml", "DafneSlicerLib"}


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in ``path``, inside functions too (relative imports excluded)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(LOGIC.rglob("*.py")), ids=lambda p: p.relative_to(LOGIC).as_posix())
def test_logic_never_imports_the_server_or_slicer(path):
    assert not _imported_packages(path) & FORBIDDEN


def test_the_layout_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dafne_server.storage import Storage\n    import vtk\n")
    assert _imported_packages(bad) & FORBIDDEN == {"dafne_server", "vtk"}


def test_core_modules_load_before_torch_exists():
    """Import every ``dafne_logic.core`` module for real in an interpreter where torch cannot load."""
    assert len(CORE_MODULES) >= 10
    script = ("import importlib, sys\n"
              "for name in ('torch', 'monai', 'safetensors'):\n"
              "    sys.modules[name] = None\n"
              f"for name in {CORE_MODULES!r}:\n"
              "    importlib.import_module(name)\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_torch_import_in_core_would_be_seen():
    script = ("import sys\nsys.modules['torch'] = None\n"
              "import dafne_logic.inference.networks\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "torch" in done.stderr
