"""DafneSlicer: thigh and calf muscle segmentation that learns from your corrections.

The module is a thin layer: widgets <-> parameter node <-> controller <-> ``dafne_logic``. Its
pieces live in ``DafneSlicerLib`` (one job per file); ``dafne_logic`` is installed beside this
file by the extension's CMake, so only torch and a few pure-Python packages need installing, on
first use and after confirmation.
"""

from __future__ import annotations

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DafneSlicerLib.parameter_node import DafneSlicerParameterNode


class DafneSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dafne Muscle Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["DafneSlicer contributors"]
        self.parent.helpText = (
            "Segments thigh and calf muscles on MRI. Click <b>Segment</b>, correct the result in the Segment "
            "Editor, mark the slices you checked, and click <b>Improve</b> to fine-tune the model on them. "
            "<b>Share</b> is off unless you opt in; images never leave your computer. "
            "Batch use: <code>Slicer --no-main-window --python-script batch_segment.py --model thigh IN OUT</code>."
        )
        self.parent.acknowledgementText = (
            "Follows Dafne (Santini et al., arXiv 2302.06352): deep anatomical federated network for "
            "muscle segmentation with incremental learning."
        )
        # The muscles' codes are not in Slicer's bundled terminology lists: load the module's own, so the
        # terminology picker offers them (as SlicerTotalSegmentator does).
        slicer.app.connect("startupCompleted()", load_muscle_terminology)


def load_muscle_terminology() -> None:
    """Load ``Resources/Terminology/DafneSlicer-muscles.term.json`` into Slicer's Terminologies module."""
    from DafneSlicerLib.terminology import load_terminology

    load_terminology(slicer.modules.terminologies.logic())


class DafneSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from DafneSlicerLib.widget import DafneSlicerPanel

        # A module added after start-up (Additional module paths, Reload) never saw startupCompleted().
        load_muscle_terminology()

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/DafneSlicer.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = DafneSlicerLogic()
        self.initializeParameterNode()
        self.panel = DafneSlicerPanel(self.ui, lambda: self._parameterNode, self, self.logic.controller)
        from DafneSlicerLib.quantitative_panel import QuantitativeSection

        quantitative = QuantitativeSection(self.layout, self.panel.controller)
        self.panel.map_selection = quantitative.selection
        self.panel.extra_action_buttons = quantitative.action_buttons
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        if self.panel is not None:  # a result must not land in the next scene, for a volume no longer there
            self.panel.controller.scene_closing()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)


class DafneSlicerLogic(ScriptedLoadableModuleLogic):
    """Logic usable without the panel (scripts, batch, self-test): synchronous versions of the buttons."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from DafneSlicerLib.install_logic import InstallLogic, read_requirements
        from DafneSlicerLib.learning_logic import LearningLogic
        from DafneSlicerLib.segmentation_logic import SegmentationLogic
        from DafneSlicerLib.slicer_packaging import SlicerPackaging
        from DafneSlicerLib.slicer_scene import SlicerScene
        from DafneSlicerLib.sync_logic import SyncLogic

        self.install = InstallLogic(SlicerPackaging(), read_requirements())
        self.segmentation = SegmentationLogic()
        self.learning = LearningLogic()
        self.sync = SyncLogic()
        self.scene = SlicerScene(slicer.mrmlScene)

    def getParameterNode(self):
        return DafneSlicerParameterNode(super().getParameterNode())

    def controller(self, view):
        from DafneSlicerLib.controller import DafneController

        return DafneController(view, self.scene, self.install, self.segmentation, self.sync)

    def segment(self, volume_node, model_name: str = "thigh", device: str = "auto", segmentation_node=None,
                side: str = "auto"):
        """Segment ``volume_node`` now (blocking) and return the segmentation node (``side``: single leg
        side, auto / right / left)."""
        from DafneSlicerLib.segmentation_logic import single_leg_side

        leg_side = single_leg_side(side)
        model = self.segmentation.load_model(model_name)
        image = self.scene.image_of(volume_node)
        labels, _ = self.segmentation.segment(image, model, device, lambda f, m: None, lambda: False, leg_side)
        return self.scene.show_labels(labels, model.labels, volume_node, f"{volume_node.GetName()} segmentation",
                                      segmentation_node)

    def statistics(self, volume_node, segmentation_node, model_name: str = "thigh"):
        """Per-muscle statistics rows of a (corrected) segmentation, also shown as a table node.

        Raises InputError when no segment is named like a muscle of ``model_name`` (a calf
        segmentation measured with the thigh table would give rows of zeros).
        """
        from dafne_logic.core.errors import InputError
        from dafne_logic.core.statistics import muscle_statistics

        table = self.segmentation.check_model(model_name).labels
        corrected = self.scene.labels_of(segmentation_node, volume_node, table)
        if len(corrected.missing_names) == 2 * table.n_muscles:
            raise InputError(f"No segment of '{segmentation_node.GetName()}' is named like a muscle of model "
                             f"{model_name} (e.g. '{table.volume_labels()[0].name}'); give the model it was made with.")
        rows = muscle_statistics(self.scene.image_of(volume_node), corrected.labels, table)
        self.scene.show_statistics(rows, f"{volume_node.GetName()} muscle statistics")
        return rows


def missing_packages() -> list[str]:
    """Python packages the module needs that Slicer's Python lacks yet ("torch>=2.4", ...)."""
    from DafneSlicerLib.install_logic import InstallLogic, read_requirements
    from DafneSlicerLib.slicer_packaging import SlicerPackaging

    return InstallLogic(SlicerPackaging(), read_requirements()).missing()


class DafneSlicerTest(ScriptedLoadableModuleTest):
    """The whole path in a real Slicer: segment a phantom, edit a segment, improve, statistics."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        missing = missing_packages()
        if missing:  # Reload and Test calls runTest outside unittest, where a SkipTest shows as a failure
            self.delayDisplay(f"DafneSlicerTest skipped: not installed yet: {', '.join(missing)}. "
                              "Click Install in the module's Dependencies section, then run it again.")
            return
        self.test_segment_edit_improve_statistics()

    def test_segment_edit_improve_statistics(self):
        import numpy as np
        import SimpleITK as sitk

        from dafne_logic.learning.finetune import FinetuneConfig
        from dafne_logic.phantoms.images import make_phantom
        from DafneSlicerLib import mrml_conversion as mc

        if missing_packages():  # ctest runs this method through unittest, which reports a skip
            self.skipTest(f"not installed: {', '.join(missing_packages())}")
        logic = DafneSlicerLogic()
        self.delayDisplay("Segmenting a thigh phantom")
        image, truth = make_phantom("thigh", shape=(4, 216, 216), seed=3)  # about 2 mm pixels, 5 mm slices
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom")
        mc.update_volume_node_from_image(volume, image)
        segmentation = logic.segment(volume, "thigh", "cpu")
        table = logic.segmentation.check_model("thigh").labels
        self.assertEqual(mc.segment_names(segmentation), [label.name for label in table.volume_labels()])

        self.delayDisplay("Editing: paint the true right vastus lateralis on slice 2")
        name, value = "right vastus lateralis", table.value_of(1, "right")
        truth_array = sitk.GetArrayFromImage(truth)  # (k, j, i), as arrayFromVolume of the same volume
        mask = np.zeros(truth_array.shape, np.uint8)
        mask[2] = truth_array[2] == value
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)
        corrected = logic.scene.labels_of(segmentation, volume, table)
        self.assertTrue((sitk.GetArrayFromImage(corrected.labels)[2][mask[2] > 0] == value).all())

        self.delayDisplay("Improving on slice 2")
        model = logic.segmentation.load_model("thigh")
        result = logic.learning.finetune(model, logic.scene.image_of(volume), corrected.labels, [2],
                                         lambda f, m: None, lambda: False, config=FinetuneConfig(max_epochs=1))
        improvement = logic.learning.save(result)
        self.assertIn(improvement.model_name, [c.name for c in logic.segmentation.list_models()])

        self.delayDisplay("Statistics")
        rows = logic.statistics(volume, segmentation, improvement.model_name)
        self.assertEqual(len(rows), len(table.volume_labels()))
        self.assertGreater(next(r for r in rows if r["name"] == name)["voxel_count"], 0)
        self.delayDisplay("Test passed")
