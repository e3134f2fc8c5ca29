"""MRML glue against real MRML (slicer-core): volumes, segmentations, export by name, .seg.nrrd files, tables."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from dafne_logic.core.errors import InputError  # noqa: E402
from dafne_logic.core.labels import THIGH  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402

SHAPE = (5, 7, 9)  # (k, j, i) = (slices, rows, columns)
RIGHT_VL = THIGH.value_of(1, "right")
LEFT_GRACILIS = THIGH.value_of(THIGH.muscle_index("gracilis"), "left")
RIGHT_SARTORIUS = THIGH.value_of(THIGH.muscle_index("sartorius"), "right")


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


DIRECTIONS = {
    "axial": np.eye(3),
    "oblique": _rotation(np.array([1.0, 2.0, 0.5]), 0.4),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
}


def _image(direction: np.ndarray, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(100, 20, SHAPE).astype(np.float32))
    image.SetSpacing((0.8, 0.9, 4.0))
    image.SetOrigin((12.5, -30.0, 71.0))
    image.SetDirection(direction.ravel().tolist())
    return image


def _labels(like: sitk.Image) -> sitk.Image:
    array = np.zeros(SHAPE, np.uint8)
    array[1:4, 1:4, 1:4] = RIGHT_VL
    array[2:5, 3:6, 5:8] = LEFT_GRACILIS
    array[0, 5:7, 0:2] = RIGHT_SARTORIUS
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(like)
    return labels


def _volume(scene, image: sitk.Image, name: str = "thigh T1") -> slicer.vtkMRMLScalarVolumeNode:
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    mc.update_volume_node_from_image(node, image)
    return node


def _ras_of_voxel(node, ijk) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint((*ijk, 1.0))[:3])


def _segment_by_name(segmentation_node, name):
    segmentation = segmentation_node.GetSegmentation()
    return segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))


@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_volume_node_round_trip_keeps_voxels_and_ras_geometry(scene, orientation):
    image = _image(DIRECTIONS[orientation])
    node = _volume(scene, image)
    # Every voxel lands where SimpleITK puts it, with x and y negated (LPS -> RAS).
    for ijk in [(0, 0, 0), (8, 0, 0), (0, 6, 0), (3, 2, 4)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(_ras_of_voxel(node, ijk), lps * [-1, -1, 1], atol=1e-9)
    back = mc.image_from_volume_node(node)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    assert back.GetPixelID() == sitk.sitkFloat32


def test_volume_node_rejects_missing_degenerate_and_vector_volumes(scene):
    with pytest.raises(InputError, match="Select an input volume"):
        mc.image_from_volume_node(None)
    one_slice = _volume(scene, sitk.Image([9, 7, 1], sitk.sitkInt16), "one slice")
    assert mc.image_from_volume_node(one_slice).GetSize() == (9, 7, 1)  # the 2D model segments it
    line = _volume(scene, sitk.Image([9, 1, 1], sitk.sitkInt16), "line")
    with pytest.raises(InputError, match="no image slice"):
        mc.image_from_volume_node(line)
    vector = slicer.vtkMRMLVectorVolumeNode()
    vector.SetName("rgb")
    scene.AddNode(vector)
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="not a 3D scalar volume"):
        mc.image_from_volume_node(vector)
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    with pytest.raises(InputError, match="no voxels"):
        mc.image_from_volume_node(empty)


@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_prediction_becomes_named_coloured_coded_segmentation(scene, orientation):
    image = _image(DIRECTIONS[orientation])
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "thigh T1 segmentation")
    # The temporary label map and its colour table are gone from the scene.
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert not scene.GetNodesByName("thigh T1 segmentation colours").GetNumberOfItems()
    assert node.GetName() == "thigh T1 segmentation"
    expected = THIGH.volume_labels()
    assert mc.segment_names(node) == [label.name for label in expected]  # all 24, in value order
    for label in expected:
        segment = _segment_by_name(node, label.name)
        np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in label.muscle.color], atol=1e-6)
        entry = segment.GetTerminology()  # reads the tag the glue sets
        assert f"SCT^{label.muscle.code.value}^{label.muscle.code.meaning}" in entry
        assert f"~SCT^{label.laterality.value}^{label.side.capitalize()}~" in entry
    reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is volume
    # The voxels come back exactly, which also checks the geometry of every segment.
    corrected = mc.segmentation_to_labels(scene, node, volume, THIGH)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))
    assert corrected.unknown_names == () and corrected.missing_names == ()


def test_labels_outside_table_or_off_grid_are_refused(scene):
    image = _image(np.eye(3))
    volume = _volume(scene, image)
    bad = sitk.GetImageFromArray(np.full(SHAPE, 200, np.uint8))
    bad.CopyInformation(image)
    with pytest.raises(InputError, match="do not match"):
        mc.labels_to_segmentation(scene, bad, THIGH, volume, "bad")
    shifted = _labels(image)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        mc.labels_to_segmentation(scene, shifted, THIGH, volume, "shifted")


def _mask_oriented_image(scene, like: sitk.Image, mask: np.ndarray):
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(like)
    mc.update_volume_node_from_image(labelmap, image)
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    scene.RemoveNode(labelmap)
    return oriented


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_corrected_segmentation_exports_by_name_after_edits(scene, orientation):
    image = _image(DIRECTIONS[orientation])
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")
    segmentation = node.GetSegmentation()
    expected = sitk.GetArrayFromImage(_labels(image))

    # Edit: paint right sartorius over a new block (what a Segment Editor stroke does).
    paint = np.zeros(SHAPE, bool)
    paint[4, 0:3, 6:9] = True
    sartorius_id = segmentation.GetSegmentIdBySegmentName("right sartorius")
    segmentation.SeparateSegmentLabelmap(sartorius_id)  # its own layer: internal label values change
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _mask_oriented_image(scene, image, paint | (expected == RIGHT_SARTORIUS)), node, sartorius_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert ok
    expected[paint] = RIGHT_SARTORIUS
    # Rename with other case, separators and side position, reorder, remove, add an unknown segment.
    _segment_by_name(node, "right vastus lateralis").SetName("Vastus_Lateralis_R")
    gracilis_id = segmentation.GetSegmentIdBySegmentName("left gracilis")
    segmentation.SetSegmentIndex(gracilis_id, 0)
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("right gracilis"))
    tumour = np.zeros(SHAPE, bool)
    tumour[0, 0, 0] = True
    tumour_id = segmentation.AddEmptySegment("", "tumour", [1.0, 1.0, 0.0])
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _mask_oriented_image(scene, image, tumour), node, tumour_id)

    corrected = mc.segmentation_to_labels(scene, node, volume, THIGH)

    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), expected)
    assert corrected.unknown_names == ("tumour",)
    assert corrected.missing_names == ("right gracilis",)
    np.testing.assert_allclose(corrected.labels.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(corrected.labels.GetOrigin(), image.GetOrigin(), atol=1e-9)


def test_reading_a_segmentation_back_leaves_no_nodes_behind(scene):
    # The read-back runs after every edit (review, Improve, Statistics): each helper node it adds,
    # a colour table Slicer makes for a label map without a display node included, must go again.
    image = _image(np.eye(3))
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")

    def nodes() -> set[str]:  # the scene's one subject hierarchy node may appear on first use: not ours
        every = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
        return {n.GetID() for n in every if not n.IsA("vtkMRMLSubjectHierarchyNode")}

    before = nodes()
    for _ in range(3):
        corrected = mc.segmentation_to_labels(scene, node, volume, THIGH)

    assert nodes() == before
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))


def test_duplicate_muscle_names_and_foreign_volumes_are_refused(scene):
    image = _image(np.eye(3))
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")
    other_image = _image(np.eye(3))
    other_image.SetSpacing((1.5, 1.5, 5.0))
    other = _volume(scene, other_image, "another series")
    with pytest.raises(InputError, match="not drawn on the grid of volume 'another series'"):
        mc.segmentation_to_labels(scene, node, other, THIGH)
    with pytest.raises(InputError, match="Select a segmentation"):
        mc.segmentation_to_labels(scene, None, volume, THIGH)
    _segment_by_name(node, "left gracilis").SetName("Right Vastus Lateralis")
    with pytest.raises(InputError, match="name the same muscle"):
        mc.segmentation_to_labels(scene, node, volume, THIGH)


def test_segmenting_again_reuses_the_node(scene):
    image = _image(np.eye(3))
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    again = mc.labels_to_segmentation(scene, empty, THIGH, volume, "seg", segmentation_node=node)
    assert again is node and len(mc.segment_names(node)) == len(THIGH.volume_labels())
    corrected = mc.segmentation_to_labels(scene, node, volume, THIGH)
    assert not sitk.GetArrayFromImage(corrected.labels).any()


def test_seg_nrrd_save_and_reload_through_storage_node(scene, tmp_path):
    image = _image(DIRECTIONS["oblique"])
    volume = _volume(scene, image)
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")
    path = tmp_path / "case.seg.nrrd"
    mc.save_segmentation(node, str(path))
    reloaded = mc.load_segmentation(scene, str(path))
    assert reloaded.GetName() == "case"
    assert mc.segment_names(reloaded) == mc.segment_names(node)
    for label in THIGH.volume_labels():
        before, after = _segment_by_name(node, label.name), _segment_by_name(reloaded, label.name)
        assert after.GetTerminology() == before.GetTerminology()
        np.testing.assert_allclose(after.GetColor(), before.GetColor(), atol=1e-6)
    corrected = mc.segmentation_to_labels(scene, reloaded, volume, THIGH)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))
    with pytest.raises(InputError, match="Could not read"):
        mc.load_segmentation(scene, str(tmp_path / "absent.seg.nrrd"))


def test_seg_nrrd_save_works_without_fchmod_and_fchown(scene, tmp_path, monkeypatch):
    """The batch script's writes on Windows, whose Python 3.12 has neither call."""
    from fakes import as_on_windows_python_312

    as_on_windows_python_312(monkeypatch)
    image = _image(DIRECTIONS["axial"])
    node = mc.labels_to_segmentation(scene, _labels(image), THIGH, _volume(scene, image), "seg")
    mc.save_segmentation(node, str(tmp_path / "case.seg.nrrd"))
    assert mc.segment_names(mc.load_segmentation(scene, str(tmp_path / "case.seg.nrrd"))) == mc.segment_names(node)
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.nrrd"]


def test_table_node_holds_statistics_rows(scene):
    table_node = slicer.vtkMRMLTableNode()
    scene.AddNode(table_node)
    rows = [{"muscle": "right sartorius", "volume_ml": 12.5, "mean": 101.0, "review": True},
            {"muscle": "left gracilis", "volume_ml": 3.25, "mean": 99.5, "review": False},
            {"muscle": "left soleus", "volume_ml": 0.0, "mean": None, "review": None}]
    mc.fill_table_node(table_node, rows)
    assert table_node.GetNumberOfColumns() == 4 and table_node.GetNumberOfRows() == 3
    assert [table_node.GetColumnName(i) for i in range(4)] == ["muscle", "volume_ml", "mean", "review"]
    assert table_node.GetCellText(1, 0) == "left gracilis"
    assert float(table_node.GetCellText(0, 1)) == pytest.approx(12.5)
    assert [table_node.GetCellText(r, 3) for r in range(3)] == ["yes", "no", ""]
    mc.fill_table_node(table_node, [])
    assert table_node.GetNumberOfColumns() == 0


def test_seg_nrrd_written_by_dafne_logic_loads_with_names_colours_terminology_geometry(scene, tmp_path):
    from dafne_logic.core.io import write_labels

    image = _image(DIRECTIONS["oblique"])
    volume = _volume(scene, image)
    path = tmp_path / "from_logic.seg.nrrd"
    write_labels(_labels(image), path, THIGH)
    node = mc.load_segmentation(scene, str(path))
    assert sorted(mc.segment_names(node)) == sorted(label.name for label in THIGH.volume_labels())
    for label in THIGH.volume_labels():
        segment = _segment_by_name(node, label.name)
        np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in label.muscle.color], atol=1e-6)
        assert segment.GetTerminology() == mc.terminology_entry(label)
    corrected = mc.segmentation_to_labels(scene, node, volume, THIGH)  # also checks the grid
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))
