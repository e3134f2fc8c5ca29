"""Fixtures for the MRML glue tests: a bare MRML scene from slicer-core (Kitware's Qt-free Slicer wheel).

slicer-core is in the ``test`` extra; without it these tests skip with a reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "DafneSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

SKIP_REASON = "slicer-core is not installed (pip install slicer-core, part of the test extra)"


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer", reason=SKIP_REASON)
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
