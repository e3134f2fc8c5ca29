"""DafneSlicer.py itself on a real MRML scene: the module file imports, and DafneSlicerLogic's
synchronous segment and statistics (what scripts and the self-test use) work.

slicer-core lacks Slicer's application-side Python (ScriptedLoadableModule, parameterNodeWrapper),
so those two are minimal stand-ins here; everything MRML is real.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402

from dafne_logic.core.labels import LEG  # noqa: E402
from dafne_logic.phantoms.images import make_phantom  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[2] / "DafneSlicer" / "DafneSlicer.py"


@pytest.fixture
def module(scene, monkeypatch):
    scripted = ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

        def delayDisplay(self, message, msec=None):  # noqa: N802 - ScriptedLoadableModuleTest's name
            self.displayed = [*getattr(self, "displayed", []), message]

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (Base,), {}))
    wrapper = ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: tuple(choices)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for name in ("DafneSlicer", "DafneSlicerLib.parameter_node"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("DafneSlicer", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    yield loaded
    sys.modules.pop("DafneSlicerLib.parameter_node", None)  # bound to the stand-in wrapper
    package = sys.modules["DafneSlicerLib"]
    if hasattr(package, "parameter_node"):
        delattr(package, "parameter_node")


@pytest.fixture
def app(monkeypatch):
    """``slicer.app`` (absent from slicer-core) as far as the module class uses it: signal connections."""
    connected = []
    monkeypatch.setattr(slicer, "app", SimpleNamespace(connect=lambda *args: connected.append(args),
                                                       connected=connected), raising=False)
    return slicer.app


def test_module_metadata(module, app):
    parent = SimpleNamespace()
    module.DafneSlicer(parent)
    assert parent.title == "Dafne Muscle Segmentation" and parent.categories == ["Segmentation"]
    assert "Share</b> is off unless you opt in" in parent.helpText


def test_muscle_terminology_loads_when_slicer_has_started(module, app, monkeypatch):
    module.DafneSlicer(SimpleNamespace())
    assert app.connected == [("startupCompleted()", module.load_muscle_terminology)]
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    monkeypatch.setattr(slicer, "modules", SimpleNamespace(terminologies=SimpleNamespace(logic=lambda: terminologies)),
                        raising=False)
    module.load_muscle_terminology()
    assert terminologies.IsTerminologyContextLoaded("Segmentation category and type - DafneSlicer muscles")
    loads = []
    monkeypatch.setattr(terminologies, "LoadTerminologyFromFile", lambda path: loads.append(path), raising=False)
    module.load_muscle_terminology()  # again, as the widget's setup does: loaded once is enough
    assert loads == []


def test_reload_and_test_without_the_packages_reports_a_skip_not_a_failure(module, monkeypatch):
    """Reload and Test calls runTest directly, outside unittest, where a SkipTest shows as a failure."""
    monkeypatch.setattr(module, "missing_packages", lambda: ["torch>=2.4", "monai>=1.5"])
    ran = []
    monkeypatch.setattr(module.DafneSlicerTest, "test_segment_edit_improve_statistics", lambda self: ran.append(1))
    test = module.DafneSlicerTest()
    test.runTest()  # raises nothing
    assert ran == [] and "skipped: not installed yet: torch>=2.4, monai>=1.5" in test.displayed[-1]
    monkeypatch.setattr(module, "missing_packages", lambda: [])
    test.runTest()
    assert ran == [1] and module.missing_packages() == []


def test_logic_segments_and_measures_synchronously(module, scene, tiny_leg_model):
    image, _ = make_phantom("leg", shape=(2, 64, 96), seed=4)
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("calf")
    scene.AddNode(volume)
    mc.update_volume_node_from_image(volume, image)
    logic = module.DafneSlicerLogic()
    assert logic.install.missing() == []  # torch and friends are importable in this environment

    segmentation = logic.segment(volume, tiny_leg_model, "cpu")

    assert segmentation.GetName() == "calf segmentation"
    assert mc.segment_names(segmentation) == [label.name for label in LEG.volume_labels()]
    rows = logic.statistics(volume, segmentation, tiny_leg_model)
    assert len(rows) == 12
    labels = sitk.GetArrayFromImage(logic.scene.labels_of(segmentation, volume, LEG).labels)
    assert sum(row["voxel_count"] for row in rows) == int((labels > 0).sum())
    assert scene.GetNodesByClassByName("vtkMRMLTableNode", "calf muscle statistics").GetNumberOfItems() == 1
    from dafne_logic.core.errors import InputError

    with pytest.raises(InputError, match="named like a muscle of model thigh"):  # was 24 rows of zeros
        logic.statistics(volume, segmentation)  # the default model: thigh
