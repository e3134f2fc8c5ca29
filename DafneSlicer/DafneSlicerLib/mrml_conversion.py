"""MRML <-> SimpleITK glue: volumes, label maps, segmentations, colour tables and table nodes.

Needs MRML (a running Slicer or the ``slicer-core`` wheel) but no Qt and no application, so every
function takes the scene or nodes it works on and is tested against real MRML with slicer-core.

Coordinates: SimpleITK images are in LPS, Slicer volume nodes in RAS. Voxel arrays are indexed
(k, j, i) = (slice, row, column) in both, so only the geometry needs converting:
``IJKToRAS = diag(-1, -1, 1) @ IJKToLPS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import InputError
from dafne_logic.core.io import label_dtype, match_label_name, terminology
from dafne_logic.core.labels import LabelTable, VolumeLabel

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Grids closer than this (mm for origins, relative for directions and spacing) count as equal.
GEOMETRY_TOLERANCE = 1e-3


# --- volumes -------------------------------------------------------------------------------------


def image_from_volume_node(volume_node: slicer.vtkMRMLScalarVolumeNode) -> sitk.Image:
    """A copy of a scalar volume node as a SimpleITK image (LPS geometry, same voxel type).

    The geometry is the node's own IJK-to-RAS, i.e. the volume's local (scanner) frame: a parent
    transform is not applied (results go under the same transform, see :func:`labels_to_segmentation`).

    Raises:
        InputError: no volume, no voxels, more than one component (vector, colour, 4D) or not
            even one 2D slice.
    """
    if volume_node is None:
        raise InputError("Select an input volume first.")
    image_data = volume_node.GetImageData()
    name = volume_node.GetName()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"Volume '{name}' has no voxels.")
    if image_data.GetNumberOfScalarComponents() != 1 or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"Volume '{name}' is not a 3D scalar volume (vector, colour or 4D volumes cannot be segmented).")
    dims = image_data.GetDimensions()
    if sorted(dims)[1] < 2:  # a single slice is a valid input (the model is 2D); a line is not
        raise InputError(f"Volume '{name}' has {dims[0]} x {dims[1]} x {dims[2]} voxels; it holds no image slice.")
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(array.copy())
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    _set_lps_geometry(image, _matrix_to_numpy(ijk_to_ras))
    return image


def update_volume_node_from_image(volume_node: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry with those of a 3D scalar SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("Only 3D scalar images can be shown as volumes.")
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    volume_node.SetAndObserveImageData(image_data)
    volume_node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_of(image)))


def ijk_to_ras_of(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK image (voxel index to RAS millimetres)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def _set_lps_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    ijk_to_lps = LPS_TO_RAS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(ijk_to_lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps / spacing).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist())


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _same_voxel_grid(a: np.ndarray, dims_a: tuple[int, ...], b: np.ndarray, dims_b: tuple[int, ...]) -> bool:
    """Whether two IJK-to-RAS matrices with voxel counts describe the same voxel grid."""
    scale = max(np.abs(a[:3, :3]).max(), 1e-6)
    return (tuple(dims_a) == tuple(dims_b)
            and np.allclose(a[:3, :3], b[:3, :3], atol=GEOMETRY_TOLERANCE * scale)
            and np.allclose(a[:3, 3], b[:3, 3], atol=GEOMETRY_TOLERANCE * max(scale, 1.0)))


# --- terminology and colour tables ---------------------------------------------------------------


def terminology_entry(label: VolumeLabel) -> str:
    """Slicer's terminology string of one bilateral label, the same entry ``dafne_logic.core.io`` writes to files.

    Format: context~category~type~type modifier~anatomic context~region~region modifier, each
    code ``scheme^value^meaning`` (no anatomic region: the type already names the muscle).
    """
    entry = terminology(label)
    return "~".join([entry["contextName"], "^".join(entry["category"]), "^".join(entry["type"]),
                     "^".join(entry["typeModifier"]), entry["anatomicContextName"], "^^", "^^"])


def color_table_node(scene: slicer.vtkMRMLScene, table: LabelTable, name: str) -> slicer.vtkMRMLColorTableNode:
    """A colour table node whose entry ``value`` is the volume label of that value (name, colour, terminology).

    Entry 0 is the transparent background. Label maps shown with this table read as muscles, and
    exporting segments with it gives every segment the value of its name.
    """
    labels = table.volume_labels()
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(labels) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for label in labels:
        r, g, b = (c / 255.0 for c in label.muscle.color)
        node.SetColor(label.value, label.name, r, g, b, 1.0)
        entry = terminology(label)
        node.SetTerminology(label.value, *entry["category"], *entry["type"], *entry["typeModifier"])
    node.SetHideFromEditors(True)
    scene.AddNode(node)
    return node


# --- segmentations -------------------------------------------------------------------------------


def labels_to_segmentation(scene: slicer.vtkMRMLScene, labels: sitk.Image, table: LabelTable,
                           volume_node: slicer.vtkMRMLVolumeNode, name: str,
                           segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                           ) -> slicer.vtkMRMLSegmentationNode:
    """Show a bilateral label map as a segmentation: one named, coloured, coded segment per label.

    Labels absent from the map still get an (empty) segment so the user can paint them. The
    segmentation takes ``volume_node``'s geometry as reference and its parent transform (linear or
    not), so it stays on the volume wherever the transform moves it. An existing ``segmentation_node``
    is emptied and reused (segmenting again replaces the previous result).

    Raises:
        InputError: the label map has values outside the table or a grid different from the volume.
    """
    _check_labels_fit(labels, table, volume_node)
    # The labels lie on the volume's voxel grid, i.e. in the volume's local frame: the label map
    # and the segmentation go under the volume's parent transform (if any), so the import copies
    # voxels without resampling and the segments move with the volume.
    transform_id = volume_node.GetTransformNodeID()
    colors = color_table_node(scene, table, f"{name} colours")
    labelmap = _temporary_labelmap(scene, colors)
    try:
        pixel = sitk.sitkUInt8 if label_dtype(table) is np.uint8 else sitk.sitkUInt16  # values above 255 must not wrap
        update_volume_node_from_image(labelmap, sitk.Cast(labels, pixel))
        labelmap.SetAndObserveTransformNodeID(transform_id)
        if segmentation_node is None:
            segmentation_node = slicer.vtkMRMLSegmentationNode()
            scene.AddNode(segmentation_node)
        segmentation_node.SetName(name)
        segmentation_node.SetAndObserveTransformNodeID(transform_id)
        segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise InputError(f"Slicer could not import the label map into segmentation '{name}'.")
    finally:
        _remove_temporary_nodes(scene, labelmap, colors)
    _complete_segments(segmentation_node, table)
    return segmentation_node


def _temporary_labelmap(scene, colors):
    """A helper label map node in ``scene`` whose display node uses ``colors`` (a user table), so
    Slicer's import and export read label names from it and add no colour table of their own
    (``ExportSegmentsToLabelmapNode`` makes one for a label map without such a display node).
    :func:`_remove_temporary_nodes` takes both away again."""
    labelmap = scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode())
    display = scene.AddNode(slicer.vtkMRMLLabelMapVolumeDisplayNode())
    labelmap.SetAndObserveDisplayNodeID(display.GetID())  # first: the clean-up finds it through the label map
    display.SetAndObserveColorNodeID(colors.GetID())
    return labelmap


def _remove_temporary_nodes(scene, labelmap, colors) -> None:
    """Drop the helper label map (with its display node) and colour table from the scene."""
    display_node = labelmap.GetDisplayNode()
    scene.RemoveNode(labelmap)
    if display_node is not None:
        scene.RemoveNode(display_node)
    scene.RemoveNode(colors)


def _check_labels_fit(labels: sitk.Image, table: LabelTable, volume_node) -> None:
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    n_labels = len(table.volume_labels())
    if values.size and (values.min() < 0 or values.max() > n_labels):
        raise InputError(f"The label map has values up to {int(values.max())} but the {table.region} table has "
                         f"{n_labels} labels; the model's labels do not match its table.")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    if not _same_voxel_grid(ijk_to_ras_of(labels), labels.GetSize(), _matrix_to_numpy(matrix),
                     volume_node.GetImageData().GetDimensions()):
        raise InputError(f"The label map does not lie on the grid of volume '{volume_node.GetName()}'.")


def _complete_segments(segmentation_node, table: LabelTable) -> None:
    """Give every table label a segment (empty if absent), in value order, with its terminology."""
    segmentation = segmentation_node.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    for label in table.volume_labels():
        segment_id = by_name.get(label.name)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment("", label.name, [c / 255.0 for c in label.muscle.color])
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(label))
        # The name and colour are the label table's, fixed: otherwise re-picking the terminology in
        # Slicer renames the segment from the type, and two heads share one type (biceps femoris
        # long and short head, both gastrocnemii), so the short head would become the long head.
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segmentation.SetSegmentIndex(segment_id, label.value - 1)


@dataclass(frozen=True)
class CorrectedLabels:
    """A segmentation turned back into volume labels for training and Dice."""

    labels: sitk.Image  # volume labels (uint8; uint16 for tables over 127 muscles) on the reference volume's grid
    unknown_names: tuple[str, ...]  # segments whose names are not in the label table (left out)
    missing_names: tuple[str, ...]  # table labels without a segment (read as absent)


def segmentation_to_labels(scene: slicer.vtkMRMLScene, segmentation_node: slicer.vtkMRMLSegmentationNode,
                           volume_node: slicer.vtkMRMLVolumeNode, table: LabelTable) -> CorrectedLabels:
    """Export a (corrected) segmentation to volume labels on ``volume_node``'s grid, matching by segment NAME.

    The internal label values of segments change as the user edits, reorders or merges layers, so
    values come from the names, matched as ``dafne_logic.core.io`` matches names in files ("right vastus
    lateralis", "Vastus_Lateralis_R", ...). Segments with other names are left out and reported.

    Raises:
        InputError: nothing selected, the segmentation was drawn on another volume's grid, or two
            segments carry the same muscle name.
    """
    if segmentation_node is None:
        raise InputError("Select a segmentation first (segment the volume, then correct it).")
    image = image_from_volume_node(volume_node)  # validates the volume
    check_segmentation_on_volume(segmentation_node, volume_node)
    segmentation = segmentation_node.GetSegmentation()
    chosen: dict[int, tuple[str, str]] = {}
    unknown: list[str] = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_name = segmentation.GetNthSegment(i).GetName()
        value = match_label_name(segment_name, table)
        if value is None:
            unknown.append(segment_name)
        elif value in chosen:
            raise InputError(f"Segments '{chosen[value][1]}' and '{segment_name}' name the same muscle; rename or "
                             "merge one of them.")
        else:
            chosen[value] = (segmentation.GetNthSegmentID(i), segment_name)
    array = np.zeros(image.GetSize()[::-1], dtype=label_dtype(table))
    if chosen:
        array = _export_by_value(scene, segmentation_node, volume_node, chosen, 2 * table.n_muscles).astype(label_dtype(table))
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    missing = tuple(label.name for label in table.volume_labels() if label.value not in chosen)
    return CorrectedLabels(labels, tuple(unknown), missing)


def _export_by_value(scene, segmentation_node, volume_node, chosen: dict[int, tuple[str, str]],
                     n_labels: int) -> np.ndarray:
    # A colour table naming each chosen segment at its table value makes Slicer write that value.
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetTypeToUser()
    colors.SetNumberOfColors(n_labels + 1)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value, (_, segment_name) in chosen.items():
        colors.SetColor(value, segment_name, 1.0, 1.0, 1.0, 1.0)
    scene.AddNode(colors)
    labelmap = _temporary_labelmap(scene, colors)
    try:
        segment_ids = vtk.vtkStringArray()
        for segment_id, _ in chosen.values():
            segment_ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap, volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok:
            raise InputError(f"Slicer could not export segmentation '{segmentation_node.GetName()}'.")
        dims = labelmap.GetImageData().GetDimensions()
        array = numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])
        return array
    finally:
        _remove_temporary_nodes(scene, labelmap, colors)


def check_segmentation_on_volume(segmentation_node, volume_node) -> None:
    """Raise InputError unless every non-empty segment lies on ``volume_node``'s voxel grid (direction, spacing, phase).

    Both nodes must be under the same parent transform: the grids are compared in each node's own
    frame, while the export resamples into world space (a segmentation moved by a transform would
    come back shifted). A segmentation whose source is not a label map (closed surfaces) is converted
    on the volume's grid instead of checked.
    """
    if (segmentation_node.GetTransformNodeID() or None) != (volume_node.GetTransformNodeID() or None):
        raise InputError(f"Segmentation '{segmentation_node.GetName()}' and volume '{volume_node.GetName()}' are under "
                         "different transforms; put both under the same one (or harden the transform on both).")
    segmentation = segmentation_node.GetSegmentation()
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != representation:
        geometry = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        earlier = segmentation.GetConversionParameter(geometry)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        # Again on this grid when it changed (not on an earlier default one), else only what is missing (an edit of
        # the source drops the converted labelmaps): every conversion marks the segments modified, which the panel
        # answers by reading the segmentation again, which would convert again, every second.
        segmentation.CreateRepresentation(representation, segmentation.GetConversionParameter(geometry) != earlier)
        return
    volume_matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(volume_matrix)
    volume = _matrix_to_numpy(volume_matrix)
    for i in range(segmentation.GetNumberOfSegments()):
        oriented = segmentation.GetNthSegment(i).GetRepresentation(representation)
        if oriented is None or oriented.IsEmpty():
            continue
        matrix = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(matrix)
        segment = _matrix_to_numpy(matrix)
        # Same axes and spacing, and the segment's first voxel on a voxel centre of the volume.
        index = np.linalg.solve(volume, segment[:, 3])[:3]
        if (not np.allclose(segment[:3, :3], volume[:3, :3], atol=GEOMETRY_TOLERANCE * np.abs(volume[:3, :3]).max())
                or not np.allclose(index, np.round(index), atol=1e-2)):
            raise InputError(f"Segmentation '{segmentation_node.GetName()}' was not drawn on the grid of volume "
                             f"'{volume_node.GetName()}'; select the volume it was made from.")


def segment_names(segmentation_node) -> list[str]:
    """Names of a segmentation's segments in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


# --- files ---------------------------------------------------------------------------------------


def save_segmentation(segmentation_node, path: str) -> None:
    """Write a segmentation as ``.seg.nrrd`` through Slicer's own storage node (names, colours, terminology).

    Atomic: the storage node writes a temporary ``.seg.nrrd`` beside ``path`` that replaces it only
    once complete, so a failed write leaves no half-written file and an existing one unchanged.
    """
    with atomic_path(path) as tmp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp))
        if not storage.WriteData(segmentation_node):
            raise InputError(f"Could not write segmentation to {path}.")


def load_segmentation(scene, path: str, name: str | None = None) -> slicer.vtkMRMLSegmentationNode:
    """Read a ``.seg.nrrd`` into a new segmentation node through Slicer's storage node."""
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name or Path(path).name.split(".")[0])  # Path: Windows paths use backslashes
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"Could not read segmentation {path}.")
    return node


# --- tables --------------------------------------------------------------------------------------


def fill_table_node(table_node: slicer.vtkMRMLTableNode, rows: list[dict[str, object]]) -> None:
    """Replace a table node's content with ``rows`` (one dict per row).

    A column holding any string or yes/no value (e.g. ``review``) is text, "yes"/"no" for the
    latter; other columns are numbers, with None (e.g. the intensity of an absent muscle) shown as NaN.
    """
    table = vtk.vtkTable()
    columns = list(rows[0]) if rows else []
    for column in columns:
        is_text = any(isinstance(row[column], (str, bool)) for row in rows)
        array = vtk.vtkStringArray() if is_text else vtk.vtkDoubleArray()
        array.SetName(column)
        for row in rows:
            value = row[column]
            if isinstance(value, bool):
                array.InsertNextValue("yes" if value else "no")
            elif is_text:
                array.InsertNextValue("" if value is None else str(value))
            else:
                array.InsertNextValue(float("nan") if value is None else float(value))
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)


# --- scene organisation --------------------------------------------------------------------------


def place_beside(node, reference_node) -> None:
    """Put ``node`` under the same subject-hierarchy parent (patient/study) as ``reference_node``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(reference_node)) or hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # Slicer's subject hierarchy logic normally creates the item when the node is added
        hierarchy.CreateItem(parent, node)


def show_in_views(segmentation_node) -> None:
    """Display nodes for slice views and a closed-surface representation for the 3D view."""
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.CreateClosedSurfaceRepresentation()


def slice_index_at(volume_node, ras: tuple[float, float, float],
                   normal: tuple[float, float, float] | None = None) -> int:
    """k index (third voxel axis) of the volume slice through a world RAS point, e.g. a slice view's centre.

    Args:
        ras: the point in world coordinates (mm); a volume under a parent transform is looked up in
            its own frame.
        normal: the viewed plane's normal in world coordinates, when the point comes from a slice
            view: the plane must be one of the volume's k slices (within about 2.5 degrees).

    Raises:
        InputError: the point lies outside the volume's slices, or the view is not along them.
    """
    world_to_local = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), world_to_local)
    local = world_to_local.TransformPoint(ras)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    if normal is not None:
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(ijk_to_ras)
        k_axis = np.array([ijk_to_ras.GetElement(row, 2) for row in range(3)])
        plane = np.array(world_to_local.TransformNormalAtPoint(ras, normal))  # normals: inverse transpose
        cosine = abs(float(k_axis @ plane)) / (np.linalg.norm(k_axis) * np.linalg.norm(plane))
        if cosine < 0.999:
            raise InputError(f"The view does not show slices of volume '{volume_node.GetName()}' "
                             f"(it is {np.degrees(np.arccos(min(cosine, 1.0))):.0f} degrees off): "
                             "reset it to the volume's slice orientation and try again.")
    k = int(round(ras_to_ijk.MultiplyPoint((*local, 1.0))[2]))
    n_slices = volume_node.GetImageData().GetDimensions()[2]
    if not 0 <= k < n_slices:
        raise InputError(f"The slice shown lies outside volume '{volume_node.GetName()}' (slice {k}, it has {n_slices}).")
    return k
