"""Fixtures for the MRML glue tests, run with slicer-core in ``.venv-slicer`` (``make test-slicer-core``).

Run with ``--confcutdir Testing/slicer_core`` so the main suite's torch fixtures are not loaded:
this environment holds slicer-core (vtk 9.6.2), SimpleITK and dafne_logic without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "DafneSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(autouse=True)
def _private_user_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DAFNE_SLICER_HOME", str(tmp_path_factory.mktemp("dafne_home")))


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed here; run `make test-slicer-core`")
    import vtk

    # Exported label maps look for Slicer's default "Labels" colour table, absent from a bare scene.
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    _register_segmentation_converters(slicer)
    return slicer.vtkMRMLScene()


def _register_segmentation_converters(slicer) -> None:
    """What Slicer's Segmentations module does at start-up; without it empty segments cannot be created."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule.__name__ not in registered:
            factory.RegisterConverterRule(rule())
