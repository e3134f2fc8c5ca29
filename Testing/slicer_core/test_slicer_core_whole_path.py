"""The module's whole path on a real MRML scene with the real dafne_logic in real worker processes:
what DafneSlicerTest does in Slicer, minus Qt (the Segment Editor stroke is a binary labelmap
written into the segment)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402
from fakes import FakeInstall, FakeView, finish  # noqa: E402

from dafne_logic.core.labels import LEG  # noqa: E402
from dafne_logic.core.paths import user_models_dir  # noqa: E402
from dafne_logic.phantoms.images import make_phantom  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402
from DafneSlicerLib.controller import DafneController  # noqa: E402
from DafneSlicerLib.segmentation_logic import SegmentationLogic  # noqa: E402
from DafneSlicerLib.slicer_scene import SlicerScene  # noqa: E402
from DafneSlicerLib.sync_logic import SyncLogic  # noqa: E402


@pytest.mark.slow  # two worker processes, each importing torch and MONAI
def test_segment_edit_improve_statistics_on_real_mrml(scene, tmp_path, tiny_leg_model):
    image, truth = make_phantom("leg", shape=(4, 96, 128), seed=5)
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("calf phantom")
    scene.AddNode(volume)
    mc.update_volume_node_from_image(volume, image)
    view = FakeView()
    # Default job runner: every long task runs in a real worker process (python -m DafneSlicerLib.worker).
    controller = DafneController(view, SlicerScene(scene), FakeInstall(), SegmentationLogic(),
                                 SyncLogic(tmp_path / "sync.json"),
                                 finetune_config={"max_epochs": 1, "min_steps_per_epoch": 1})

    controller.segment(volume, tiny_leg_model, "cpu")
    finish(controller, timeout=300)
    assert not view.errors, view.errors
    node = controller.case.segmentation_node
    assert node.GetName() == "calf phantom segmentation" and node.GetScene() is scene
    assert mc.segment_names(node) == [label.name for label in LEG.volume_labels()]

    # A Segment Editor stroke (overwriting other segments, the editor's default): slice 1 of
    # "right soleus" becomes the true right soleus.
    value = LEG.value_of(1, "right")
    segmentation = node.GetSegmentation()
    soleus_id = segmentation.GetSegmentIdBySegmentName("right soleus")
    current = sitk.GetArrayFromImage(controller.scene.labels_of(node, volume, LEG).labels)
    wanted = current == value
    wanted[1] = sitk.GetArrayViewFromImage(truth)[1] == value
    mask = sitk.GetImageFromArray(wanted.astype(np.uint8))
    mask.CopyInformation(image)
    stroke = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(stroke)
    mc.update_volume_node_from_image(stroke, mask)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(stroke), node, soleus_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, None, False,
        [i for i in segmentation.GetSegmentIDs() if i != soleus_id])
    scene.RemoveNode(stroke)

    controller.update_review()
    assert view.summaries[-1] == "Changed slices: 1. Reviewed: none."
    controller.mark_slices("1-2")
    assert view.summaries[-1] == "Changed slices: 1. Reviewed: 1-2."
    controller.improve()
    finish(controller, timeout=300)
    assert not view.errors, view.errors
    assert (user_models_dir() / controller.case.model_name / "weights.safetensors").is_file()
    assert controller.case.model_name in view.models[-1][0] and view.models[-1][1] == controller.case.model_name

    controller.statistics()
    tables = scene.GetNodesByClass("vtkMRMLTableNode")
    assert tables.GetNumberOfItems() == 1
    table = tables.GetItemAsObject(0)
    assert table.GetName() == "calf phantom muscle statistics" and table.GetNumberOfRows() == 2 * LEG.n_muscles
    soleus_row = next(r for r in range(table.GetNumberOfRows()) if table.GetCellText(r, 1) == "right soleus")
    assert int(float(table.GetCellText(soleus_row, 4))) == int(wanted.sum())  # voxel_count of the edited segment
