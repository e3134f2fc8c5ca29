"""The controller's :class:`~DafneSlicerLib.controller.SceneAdapter` for a Slicer scene.

Scene-only methods run on any MRML scene (tested with slicer-core); the few that need Slicer's
application (views, Segment Editor) import ``slicer.app`` / ``slicer.util`` when called.
"""

from __future__ import annotations

from typing import Any

import SimpleITK as sitk
import slicer

from dafne_logic.core.labels import LabelTable

from . import mrml_conversion as mc

# vtkSegmentation events a segmentation node forwards when the user edits it: painting changes the
# source representation, renaming or recolouring modifies the segment, and segments come and go.
SEGMENTATION_EVENTS = ("SourceRepresentationModified", "SegmentModified", "SegmentAdded", "SegmentRemoved")


class SlicerScene:
    def __init__(self, scene: slicer.vtkMRMLScene):
        self.scene = scene

    def image_of(self, volume_node) -> sitk.Image:
        return mc.image_from_volume_node(volume_node)

    def node_name(self, node) -> str:
        return node.GetName()

    def node_exists(self, node) -> bool:
        return node is not None and node.GetScene() is self.scene and self.scene.IsNodePresent(node) != 0

    def show_labels(self, labels: sitk.Image, table: LabelTable, volume_node, name: str, segmentation_node=None):
        node = mc.labels_to_segmentation(self.scene, labels, table, volume_node, name, segmentation_node)
        mc.place_beside(node, volume_node)
        mc.show_in_views(node)
        return node

    def labels_of(self, segmentation_node, volume_node, table: LabelTable) -> mc.CorrectedLabels:
        return mc.segmentation_to_labels(self.scene, segmentation_node, volume_node, table)

    def show_statistics(self, rows: list[dict[str, Any]], name: str):
        # GetFirstNode, not GetNodesByClassByName: that one hands over a collection the caller must free.
        table_node = self.scene.GetFirstNode(name, "vtkMRMLTableNode")
        if table_node is None:
            table_node = slicer.vtkMRMLTableNode()
            table_node.SetName(name)
            self.scene.AddNode(table_node)
        mc.fill_table_node(table_node, rows)
        if hasattr(slicer, "app"):  # a running Slicer: show the table below the views
            layout = slicer.app.layoutManager()
            # tableViewCount counts table views ever made; only one mapped in the current layout shows it.
            shown = layout is not None and any(layout.tableWidget(i).mrmlTableViewNode().IsMappedInLayout()
                                               for i in range(layout.tableViewCount))
            if layout is not None and not shown:  # e.g. Conventional: nowhere to show the table
                layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table_node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        return table_node

    def maps_of(self, reference: sitk.Image, volume_node, selection) -> list:
        from . import quantitative_logic as ql

        return ql.maps_from_volume_nodes(reference, reference_node=volume_node, water_node=selection.water, fat_node=selection.fat,
                                         fat_fraction_node=selection.fat_fraction, map_nodes=selection.others,
                                         missing_as_nan=selection.nan_as_missing)

    def show_fat_fraction_chart(self, rows: list[dict[str, Any]], table: LabelTable, name: str):
        from . import quantitative_logic as ql

        return ql.show_fat_fraction_chart(self.scene, rows, table, name)

    def show_cross_sectional_areas(self, labels: sitk.Image, table: LabelTable, name: str):
        from . import quantitative_logic as ql

        return ql.show_cross_sectional_areas(self.scene, labels, table, name)

    def export_dicom_seg(self, volume_node, labels: sitk.Image, table: LabelTable, path: str, model_name: str,
                         model_version: str, corrected: bool) -> list[int]:
        from . import quantitative_logic as ql

        database = getattr(slicer, "dicomDatabase", None)
        file_for_instance = database.fileForInstance if database is not None else (lambda uid: "")
        return ql.export_dicom_seg(volume_node, labels, table, path, file_for_instance, model_name=model_name,
                                   model_version=model_version, corrected=corrected)

    def open_segment_editor(self, segmentation_node, volume_node) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentation_node)
        editor.setSourceVolumeNode(volume_node)

    def current_slice(self, volume_node) -> int:
        slice_node = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        slice_to_ras = slice_node.GetSliceToRAS()
        centre = tuple(slice_to_ras.GetElement(row, 3) for row in range(3))
        normal = tuple(slice_to_ras.GetElement(row, 2) for row in range(3))
        return mc.slice_index_at(volume_node, centre, normal)
