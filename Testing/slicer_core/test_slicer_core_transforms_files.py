"""Real MRML (slicer-core): volumes under parent transforms, and atomic .seg.nrrd writes."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
import vtk.util.numpy_support  # noqa: E402

from dafne_logic.core.errors import InputError  # noqa: E402
from dafne_logic.core.labels import THIGH  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402

SHAPE = (4, 6, 8)
RIGHT_VL = THIGH.value_of(1, "right")


def _image() -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32))
    image.SetSpacing((0.8, 0.9, 4.0))
    image.SetOrigin((12.5, -30.0, 71.0))
    return image


def _labels(like: sitk.Image) -> sitk.Image:
    array = np.zeros(SHAPE, np.uint8)
    array[1:3, 2:4, 3:6] = RIGHT_VL
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(like)
    return labels


def _volume(scene, image):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("thigh")
    scene.AddNode(node)
    mc.update_volume_node_from_image(node, image)
    return node


def _linear_transform(scene):
    """A rotation about S by 30 degrees and a 40 mm shift, as a registration would give."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    matrix = np.array([[c, -s, 0, 40.0], [s, c, 0, -15.0], [0, 0, 1, 7.0], [0, 0, 0, 1]])
    node = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(node)
    vtk_matrix = vtk.vtkMatrix4x4()
    vtk_matrix.DeepCopy(matrix.ravel().tolist())
    node.SetMatrixTransformToParent(vtk_matrix)
    return node, matrix


def _world_of(node, local_ras: np.ndarray) -> np.ndarray:
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, to_world)
    return np.array(to_world.TransformPoint(*local_ras))


def _segmentation_of_transformed_volume(scene):
    """(image, volume under a linear transform, transform, its 4x4 matrix, segmentation made on it)."""
    image = _image()
    volume = _volume(scene, image)
    transform, matrix = _linear_transform(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")
    return image, volume, transform, matrix, segmentation


def test_segmentation_of_a_transformed_volume_lies_on_the_volume_in_world_space(scene):
    image, volume, transform, matrix, segmentation = _segmentation_of_transformed_volume(scene)

    assert segmentation.GetTransformNodeID() == transform.GetID()
    # The segment's first voxel and the volume's voxel it labels coincide in world coordinates.
    segment = segmentation.GetSegmentation().GetSegment(
        segmentation.GetSegmentation().GetSegmentIdBySegmentName("right vastus lateralis"))
    oriented = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    segment_matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(segment_matrix)
    extent = oriented.GetExtent()
    first = segment_matrix.MultiplyPoint((extent[0], extent[2], extent[4], 1.0))[:3]
    volume_matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(volume_matrix)
    voxel = volume_matrix.MultiplyPoint((3, 2, 1, 1.0))[:3]  # (i, j, k) of array[1, 2, 3]
    np.testing.assert_allclose(_world_of(segmentation, first), _world_of(volume, voxel), atol=1e-4)
    np.testing.assert_allclose(_world_of(volume, voxel), matrix[:3, :3] @ voxel + matrix[:3, 3], atol=1e-4)
    # The import did not resample: the labels come back voxel for voxel.
    corrected = mc.segmentation_to_labels(scene, segmentation, volume, THIGH)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))


def test_reused_segmentation_follows_the_volume_out_of_its_transform(scene):
    image, volume, _, _, segmentation = _segmentation_of_transformed_volume(scene)
    volume.SetAndObserveTransformNodeID(None)
    again = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg", segmentation_node=segmentation)
    assert again is segmentation and again.GetTransformNodeID() is None


def _segmentation(scene):
    image = _image()
    return mc.labels_to_segmentation(scene, _labels(image), THIGH, _volume(scene, image), "seg")


def test_seg_nrrd_is_written_atomically_and_loads_back(scene, tmp_path):
    path = tmp_path / "case.seg.nrrd"
    path.write_bytes(b"previous result")
    mc.save_segmentation(_segmentation(scene), str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.nrrd"]
    assert "right vastus lateralis" in mc.segment_names(mc.load_segmentation(scene, str(path)))


class _HalfWritingStorageNode(slicer.vtkMRMLSegmentationStorageNode):
    """Writes the start of a file, then fails, like a full disk or a killed process."""

    written_to: list[str] = []

    def WriteData(self, node):  # noqa: N802 - VTK's name
        self.written_to.append(self.GetFileName())
        with open(self.GetFileName(), "wb") as f:
            f.write(b"NRRD0004\npartial")
        return 0


def test_failed_seg_nrrd_write_leaves_the_old_file_and_no_partial_one(scene, tmp_path, monkeypatch):
    segmentation = _segmentation(scene)
    monkeypatch.setattr(mc.slicer, "vtkMRMLSegmentationStorageNode", _HalfWritingStorageNode)
    path = tmp_path / "case.seg.nrrd"
    path.write_bytes(b"previous result")
    with pytest.raises(InputError, match="Could not write segmentation"):
        mc.save_segmentation(segmentation, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.nrrd"] and path.read_bytes() == b"previous result"
    # The storage node wrote a temporary name with the .seg.nrrd suffix it picks its writer by.
    assert _HalfWritingStorageNode.written_to[-1].endswith(".seg.nrrd")
    assert _HalfWritingStorageNode.written_to[-1] != str(path)
    with pytest.raises(InputError):
        mc.save_segmentation(segmentation, str(tmp_path / "new.seg.nrrd"))
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.nrrd"]


def test_segmentation_of_a_volume_under_a_non_linear_transform_shares_it(scene):
    """A deformable registration's grid transform: the labels stay in the volume's local frame, under it."""
    image = _image()
    volume = _volume(scene, image)
    grid = vtk.vtkImageData()
    grid.SetDimensions(4, 4, 4)
    grid.SetSpacing(50.0, 50.0, 50.0)
    grid.SetOrigin(-100.0, -100.0, -100.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacements = vtk.util.numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())
    displacements[:] = np.random.default_rng(1).normal(0.0, 3.0, displacements.shape)
    deformation = slicer.vtkOrientedGridTransform()
    deformation.SetDisplacementGridData(grid)
    transform = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(transform)
    transform.SetAndObserveTransformToParent(deformation)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert not transform.IsLinear()

    segmentation = mc.labels_to_segmentation(scene, _labels(image), THIGH, volume, "seg")

    assert segmentation.GetTransformNodeID() == transform.GetID()
    corrected = mc.segmentation_to_labels(scene, segmentation, volume, THIGH)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(corrected.labels), sitk.GetArrayFromImage(_labels(image)))
