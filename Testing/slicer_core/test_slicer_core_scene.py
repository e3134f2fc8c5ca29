"""The Slicer scene adapter on a real MRML scene: study placement, views, tables, slice picking."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from dafne_logic.core.errors import InputError  # noqa: E402
from dafne_logic.core.labels import LEG  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402
from DafneSlicerLib.slicer_scene import SEGMENTATION_EVENTS, SlicerScene  # noqa: E402


def _volume_and_labels(scene):
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 5.0))
    image.SetOrigin((-5.0, 3.0, 100.0))
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("calf")
    scene.AddNode(volume)
    mc.update_volume_node_from_image(volume, image)
    array = np.zeros((6, 8, 10), np.uint8)
    array[2:5, 2:6, 2:5] = LEG.value_of(1, "right")
    array[1:3, 1:4, 6:9] = LEG.value_of(4, "left")
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    return volume, labels, array


def test_segmentation_goes_under_the_volume_study_and_into_the_views(scene):
    volume, labels, array = _volume_and_labels(scene)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient 1")
    study = hierarchy.CreateStudyItem(patient, "thigh MRI 2026")
    hierarchy.CreateItem(study, volume)  # what loading a DICOM study does
    adapter = SlicerScene(scene)

    node = adapter.show_labels(labels, LEG, volume, "calf segmentation")

    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetDisplayNode() is not None
    segment = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("right soleus"))
    surface = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert surface is not None and surface.GetNumberOfPoints() > 0  # shown in 3D
    corrected = adapter.labels_of(node, volume, LEG)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), array)
    assert adapter.node_exists(node) and adapter.node_name(node) == "calf segmentation"
    scene.RemoveNode(node)
    assert not adapter.node_exists(node)


def test_statistics_table_is_created_once_and_refilled(scene):
    adapter = SlicerScene(scene)
    rows = [{"name": "right soleus", "volume_ml": 1.5, "mean": None}]
    first = adapter.show_statistics(rows, "calf muscle statistics")
    second = adapter.show_statistics(rows + rows, "calf muscle statistics")
    assert first is second and second.GetNumberOfRows() == 2
    assert second.GetCellText(0, 2) == "nan"  # absent intensity of an empty muscle


def test_slice_index_of_a_ras_point(scene):
    volume, _, _ = _volume_and_labels(scene)
    # Slice k lies at z = 100 + 5 k (identity direction, LPS z = RAS z).
    assert mc.slice_index_at(volume, (0.0, 0.0, 115.0)) == 3
    assert mc.slice_index_at(volume, (0.0, 0.0, 101.0)) == 0
    with pytest.raises(InputError, match="outside volume 'calf'"):
        mc.slice_index_at(volume, (0.0, 0.0, 200.0))


def test_slice_index_follows_the_parent_transform_and_refuses_other_views(scene):
    volume, _, _ = _volume_and_labels(scene)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 50.0)  # the volume moved 50 mm up: its slice 3 is now at world z = 165
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    assert mc.slice_index_at(volume, (0.0, 0.0, 165.0), normal=(0.0, 0.0, 1.0)) == 3
    assert mc.slice_index_at(volume, (0.0, 0.0, 165.0), normal=(0.0, 0.01, -1.0)) == 3  # within tolerance
    with pytest.raises(InputError, match="does not show slices of volume 'calf'"):
        mc.slice_index_at(volume, (0.0, 0.0, 165.0), normal=(1.0, 0.0, 0.0))  # a sagittal view

    # A sheared parent (z' = z + 0.5 y) tilts the volume's slices: only a view along them is accepted.
    shear = vtk.vtkMatrix4x4()
    shear.SetElement(2, 1, 0.5)
    transform.SetMatrixTransformToParent(shear)
    assert mc.slice_index_at(volume, (0.0, 0.0, 115.0), normal=(0.0, -0.5, 1.0)) == 3
    with pytest.raises(InputError, match="does not show slices"):
        mc.slice_index_at(volume, (0.0, 0.0, 115.0), normal=(0.0, 0.0, 1.0))


def test_edits_fire_the_events_the_panel_observes(scene):
    volume, labels, array = _volume_and_labels(scene)
    node = SlicerScene(scene).show_labels(labels, LEG, volume, "calf segmentation")
    fired = []
    for event in SEGMENTATION_EVENTS:
        node.AddObserver(getattr(slicer.vtkSegmentation, event), lambda caller, e, name=event: fired.append(name))
    stroke = np.zeros(array.shape, np.uint8)
    stroke[0, 0:2, 0:2] = 1
    image = sitk.GetImageFromArray(stroke)
    image.CopyInformation(labels)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    mc.update_volume_node_from_image(labelmap, image)
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("right soleus")
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap), node, segment_id)
    assert "SourceRepresentationModified" in fired  # a paint stroke
    fired.clear()
    node.GetSegmentation().GetSegment(segment_id).SetName("Soleus_R")
    assert fired == ["SegmentModified"]  # a rename
    node.GetSegmentation().RemoveSegment(segment_id)
    assert "SegmentRemoved" in fired


def test_continue_with_a_saved_segmentation_and_refuse_another_volumes(scene, tmp_path):
    from fakes import FakeInstall, FakeSegmentation, FakeView

    from dafne_logic.core.io import write_labels
    from DafneSlicerLib.controller import DafneController
    from DafneSlicerLib.sync_logic import SyncLogic

    volume, labels, array = _volume_and_labels(scene)
    write_labels(labels, tmp_path / "saved.seg.nrrd", LEG)
    saved = mc.load_segmentation(scene, str(tmp_path / "saved.seg.nrrd"))
    view = FakeView()
    controller = DafneController(view, SlicerScene(scene), FakeInstall(), FakeSegmentation(), SyncLogic(tmp_path / "s"))

    other_image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.float32))
    other_image.SetSpacing((2.0, 2.0, 5.0))
    other = slicer.vtkMRMLScalarVolumeNode()
    other.SetName("other series")
    scene.AddNode(other)
    mc.update_volume_node_from_image(other, other_image)
    controller.adopt(other, saved, "leg")
    assert view.errors == ["Segmentation 'saved' was not drawn on the grid of volume 'other series'; select the "
                           "volume it was made from."]
    assert controller.case is None

    controller.adopt(volume, saved, "leg")
    assert view.errors[1:] == [] and controller.case.segmentation_node is saved
    np.testing.assert_array_equal(controller.case.tracker.automatic, array)
    assert "12 of 12 labels have a segment" in view.statuses[-1]
