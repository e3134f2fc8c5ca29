"""Quantitative muscle MRI in a Slicer scene: maps from volume nodes, a fat-fraction bar chart (left
beside right), the cross-sectional area along the leg (table + plot) and DICOM SEG export.

The numbers come from ``dafne_logic`` (:mod:`~dafne_logic.core.quantitative`,
:mod:`~dafne_logic.core.csa`, :mod:`~dafne_logic.core.dicom_seg`); this module only converts
between MRML nodes and those functions. Scene-only: it runs on a bare MRML scene (slicer-core);
showing a chart in the layout needs Slicer's application and is skipped without it. The
``dafne_logic`` modules that need scipy are imported when called: Slicer loads this module before
the user agreed to install packages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import SimpleITK as sitk
import slicer

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import LabelTable

from . import mrml_conversion as mc

# Volume-node attribute Slicer's DICOM plugin sets on a loaded series: its SOP instance UIDs.
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


def maps_from_volume_nodes(reference: sitk.Image, *, reference_node=None, water_node=None, fat_node=None,
                           fat_fraction_node=None, map_nodes: Sequence[tuple[str, Any]] = (),
                           missing_as_nan: bool = False) -> list:
    """The maps picked in the panel's volume selectors (``QuantitativeMap`` list) on ``reference``'s grid
    (see :func:`dafne_logic.core.quantitative.build_maps`; ``missing_as_nan``: NaN and infinite voxels
    are left out of every summary instead of refused).

    ``reference`` is ``reference_node``'s voxels in its local frame (parent transform not applied), and
    so are the maps': a map under another parent transform than ``reference_node`` is refused.
    """
    from dafne_logic.core.quantitative import build_maps

    picked = [water_node, fat_node, fat_fraction_node, *(node for _, node in map_nodes)]
    check_same_transform(reference_node, [node for node in picked if node is not None])

    def image(node) -> sitk.Image | None:
        return None if node is None else mc.image_from_volume_node(node)

    return build_maps(reference, water=image(water_node), fat=image(fat_node), fat_fraction=image(fat_fraction_node),
                      others=[(name, mc.image_from_volume_node(node)) for name, node in map_nodes],
                      missing_as_nan=missing_as_nan)


def check_same_transform(reference_node, map_nodes: Sequence[Any]) -> None:
    """Raise :class:`InputError` unless every map node sits under ``reference_node``'s parent transform.

    Maps and image are compared voxel by voxel in their local (scanner) frames, as the segmentation
    is: a map aligned to the image by a transform of its own would be measured where it was acquired,
    not where it is shown.
    """
    if reference_node is None:
        return
    expected = reference_node.GetTransformNodeID()
    for node in map_nodes:
        if node.GetTransformNodeID() != expected:
            raise InputError(f"Volume '{node.GetName()}' is under {_transform_name(node)} and '{reference_node.GetName()}' "
                             f"under {_transform_name(reference_node)}: harden the transforms (Data module, right-click, "
                             "Harden transform) or put both under the same one.")


def _transform_name(node) -> str:
    transform = node.GetParentTransformNode()
    return "no transform" if transform is None else f"transform '{transform.GetName()}'"


def _node(scene, class_name: str, name: str):
    """The node of ``class_name`` called ``name``, created if the scene has none (recomputing replaces content)."""
    # GetFirstNode, not GetNodesByClassByName: that one hands over a collection the caller must free.
    node = scene.GetFirstNode(name, class_name)
    return node if node is not None else scene.AddNewNodeByClass(class_name, name)


def _chart(scene, name: str, table_node, series: Sequence[tuple[str, str, str, tuple[float, float, float]]],
           plot_type: int, x_title: str, y_title: str):
    """A chart of ``series`` = (series name, x column, y column, RGB 0..1) read from ``table_node``.

    For bar charts the x column is a text column of bar labels.
    """
    chart = _node(scene, "vtkMRMLPlotChartNode", name)
    wanted = {f"{name}: {series_name}" for series_name, *_ in series}
    for i in reversed(range(chart.GetNumberOfPlotSeriesNodes())):  # series of an earlier run no longer drawn
        old = chart.GetNthPlotSeriesNode(i)
        if old is not None and old.GetName() not in wanted:
            scene.RemoveNode(old)
    chart.RemoveAllPlotSeriesNodeIDs()
    for series_name, x_column, y_column, colour in series:
        plot = _node(scene, "vtkMRMLPlotSeriesNode", f"{name}: {series_name}")
        plot.SetAndObserveTableNodeID(table_node.GetID())
        plot.SetPlotType(plot_type)
        if plot_type == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar:
            plot.SetLabelColumnName(x_column)
        else:
            plot.SetXColumnName(x_column)
        plot.SetYColumnName(y_column)
        plot.SetColor(*colour)
        chart.AddAndObservePlotSeriesNodeID(plot.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    _show_in_layout(chart)
    return chart


def _show_in_layout(chart) -> None:
    if hasattr(slicer, "app"):  # a running Slicer: switch to a layout with a plot view
        slicer.modules.plots.logic().ShowChartInLayout(chart)


RIGHT_COLOUR, LEFT_COLOUR = (0.85, 0.35, 0.2), (0.2, 0.45, 0.8)


def show_fat_fraction_chart(scene, rows: list[dict[str, Any]], table: LabelTable, name: str):
    """A bar chart of the mean fat fraction (%) per muscle, right and left bars side by side.

    ``rows`` are statistics rows with ``fat_fraction_mean`` (None or absent for a muscle without
    voxels: drawn as no bar). Returns the chart node; its table node is ``name + " table"``.
    """
    from dafne_logic.core.quantitative import FAT_FRACTION

    by_value = {row["label_value"]: row.get(f"{FAT_FRACTION}_mean") for row in rows}
    if not any(value is not None for value in by_value.values()):
        raise InputError("No fat fraction was measured: pick the Dixon water and fat volumes or a fat-fraction map.")
    chart_rows = [{"muscle": muscle.name,
                   "right": by_value.get(table.value_of(i, "right")),
                   "left": by_value.get(table.value_of(i, "left"))}
                  for i, muscle in enumerate(table.muscles, start=1)]
    table_node = _node(scene, "vtkMRMLTableNode", f"{name} table")
    mc.fill_table_node(table_node, chart_rows)
    return _chart(scene, name, table_node, [("right", "muscle", "right", RIGHT_COLOUR), ("left", "muscle", "left", LEFT_COLOUR)],
                  slicer.vtkMRMLPlotSeriesNode.PlotTypeBar, "muscle", "fat fraction (%)")


def show_cross_sectional_areas(scene, labels: sitk.Image, table: LabelTable, name: str):
    """The CSA of every muscle along the leg: a long table (one row per muscle and slice, as the CSV)
    and a plot of area (mm²) against slice position (mm), one line per muscle present.

    Returns (table node of the long rows, chart node).
    """
    from dafne_logic.core.csa import cross_sectional_areas

    rows = cross_sectional_areas(labels, table)
    if not rows:
        raise InputError("The segmentation holds no muscle: there is no cross-sectional area to show.")
    long_table = _node(scene, "vtkMRMLTableNode", f"{name} table")
    mc.fill_table_node(long_table, rows)
    # The plot reads one column per muscle over the slice positions (NaN where a muscle is absent).
    positions = sorted({row["position_mm"] for row in rows})
    present = [label for label in table.volume_labels() if any(row["label_value"] == label.value for row in rows)]
    area = {(row["label_value"], row["position_mm"]): row["area_mm2"] for row in rows}
    wide = [{"position_mm": p, **{label.name: area.get((label.value, p)) for label in present}} for p in positions]
    wide_table = _node(scene, "vtkMRMLTableNode", f"{name} plot table")
    mc.fill_table_node(wide_table, wide)
    series = [(label.name, "position_mm", label.name, tuple(c / 255.0 for c in label.muscle.color)) for label in present]
    chart = _chart(scene, name, wide_table, series, slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter,
                   "position along the leg, S (mm)", "cross-sectional area (mm²)")
    return long_table, chart


def dicom_source_files(volume_node, file_for_instance: Callable[[str], str]) -> list[str]:
    """The DICOM files a volume node was loaded from (Slicer's DICOM database resolves each UID:
    ``slicer.dicomDatabase.fileForInstance``). One sentence when the volume has no DICOM source."""
    uids = (volume_node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise InputError(f"Volume '{volume_node.GetName()}' was not loaded from DICOM, so a DICOM SEG cannot reference "
                         "its source; save the segmentation as .seg.nrrd instead.")
    files = [file_for_instance(uid) for uid in uids]
    missing = [uid for uid, path in zip(uids, files, strict=True) if not path]
    if missing:
        raise InputError(f"{len(missing)} DICOM images of volume '{volume_node.GetName()}' are no longer in the DICOM "
                         "database; import the series again before exporting a DICOM SEG.")
    return files


def export_dicom_seg(volume_node, labels: sitk.Image, table: LabelTable, path: str,
                     file_for_instance: Callable[[str], str], *, model_name: str, model_version: str,
                     corrected: bool) -> list[int]:
    """Write the segmentation (volume labels on the volume's grid) as a DICOM SEG referencing the
    volume's DICOM series. ``corrected`` marks edited results as SEMIAUTOMATIC. Returns the label
    values written, in segment order."""
    from dafne_logic.core.dicom_seg import write_dicom_seg

    files = dicom_source_files(volume_node, file_for_instance)
    return write_dicom_seg(labels, files, table, path, algorithm_name=f"DafneSlicer {model_name}",
                           algorithm_version=model_version, automatic=not corrected)
