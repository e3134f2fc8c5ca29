"""Fixtures for the MRML glue tests: a bare MRML scene from slicer-core (Kitware's Qt-free Slicer wheel).

slicer-core is in the ``test`` extra; without it these tests skip with a reason.
"""

from __future__ import annotations

import pytest

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


@pytest.fixture
def tiny_leg_model() -> str:
    """An untrained 3-level U-Net for the calf table, saved where the registry finds user models."""
    from dafne_logic.core.labels import LEG
    from dafne_logic.core.paths import user_models_dir
    from dafne_logic.core.preprocessing import PreprocessingParams
    from dafne_logic.inference.manifest import Manifest
    from dafne_logic.inference.model_package import ModelPackage
    from dafne_logic.inference.networks import build_network, unet_architecture

    arch = unet_architecture(LEG.n_classes, {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    manifest = Manifest(name="leg", region="leg", version="1", architecture=arch, labels=LEG,
                        preprocessing=PreprocessingParams(spacing_mm=(2.0, 2.0)), provenance={"trained_on": "nothing"})
    state = {k: v.detach().clone() for k, v in build_network(arch).state_dict().items()}
    ModelPackage(manifest, state).save(user_models_dir() / "tiny-leg")
    return "tiny-leg"
