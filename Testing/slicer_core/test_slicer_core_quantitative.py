"""Quantitative MRI in a real MRML scene: maps from volume nodes, the fat-fraction bar chart (left beside
right), the cross-sectional-area table and plot, DICOM SEG export from a volume loaded from DICOM."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")
import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from dicom_seg_readback import segment_numbers_as_labels  # noqa: E402

from dafne_logic.core.errors import InputError  # noqa: E402
from dafne_logic.core.io import choose_dicom_series, read_image  # noqa: E402
from dafne_logic.core.labels import LEG  # noqa: E402
from dafne_logic.core.statistics import muscle_statistics  # noqa: E402
from dafne_logic.phantoms.dicom import write_dicom_series  # noqa: E402
from dafne_logic.phantoms.images import make_phantom, true_fat_fraction  # noqa: E402
from DafneSlicerLib import mrml_conversion as mc  # noqa: E402
from DafneSlicerLib import quantitative_logic as ql  # noqa: E402

GEOMETRY = dict(shape=(3, 96, 128), fat_infiltration=0.3, seed=6)


def _volume(scene, image, name):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    mc.update_volume_node_from_image(node, image)
    return node


def _table_columns(table_node) -> dict[str, list]:
    table = table_node.GetTable()
    columns = {}
    for c in range(table.GetNumberOfColumns()):
        array = table.GetColumn(c)
        columns[array.GetName()] = [array.GetValue(r) for r in range(table.GetNumberOfRows())]
    return columns


def test_fat_fraction_from_volume_nodes_and_the_left_right_bar_chart(scene):
    water, labels = make_phantom("leg", contrast="water", **GEOMETRY)
    fat, _ = make_phantom("leg", contrast="fat", **GEOMETRY)
    _, truth = true_fat_fraction("leg", **GEOMETRY)
    water_node, fat_node = _volume(scene, water, "water"), _volume(scene, fat, "fat")
    reference = mc.image_from_volume_node(water_node)
    maps = ql.maps_from_volume_nodes(reference, water_node=water_node, fat_node=fat_node, map_nodes=[("T2", water_node)])
    assert [m.name for m in maps] == ["fat_fraction", "T2"]
    labels.CopyInformation(reference)
    rows = muscle_statistics(reference, labels, LEG, maps=maps, erode_mm=0.0)
    assert all(abs(row["fat_fraction_mean"] - truth[row["label_value"]]) < 4.0 for row in rows)

    chart = ql.show_fat_fraction_chart(scene, rows, LEG, "calf fat fraction")
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i)) for i in range(2)]
    assert {s.GetPlotType() for s in series} == {slicer.vtkMRMLPlotSeriesNode.PlotTypeBar}
    assert [s.GetYColumnName() for s in series] == ["right", "left"]
    columns = _table_columns(series[0].GetTableNode())
    assert columns["muscle"] == [m.name for m in LEG.muscles]
    by_value = {row["label_value"]: row["fat_fraction_mean"] for row in rows}
    np.testing.assert_allclose(columns["right"], [by_value[LEG.value_of(i, "right")] for i in range(1, 7)])
    np.testing.assert_allclose(columns["left"], [by_value[LEG.value_of(i, "left")] for i in range(1, 7)])
    # Recomputing replaces the chart's content instead of piling up nodes.
    ql.show_fat_fraction_chart(scene, rows, LEG, "calf fat fraction")
    assert scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1
    assert scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 2


def test_a_missing_fat_volume_or_no_fat_fraction_is_one_sentence(scene):
    water, labels = make_phantom("leg", contrast="water", **GEOMETRY)
    water_node = _volume(scene, water, "water")
    with pytest.raises(InputError, match="go together"):
        ql.maps_from_volume_nodes(water, water_node=water_node)
    rows = muscle_statistics(water, labels, LEG)
    with pytest.raises(InputError, match="No fat fraction"):
        ql.show_fat_fraction_chart(scene, rows, LEG, "chart")


def test_a_map_under_another_transform_than_the_image_is_refused(scene):
    """Maps are compared with the image in their local frames: a map moved by a transform of its own is refused."""
    water, _ = make_phantom("leg", contrast="water", **GEOMETRY)
    fat, _ = make_phantom("leg", contrast="fat", **GEOMETRY)
    water_node, fat_node = _volume(scene, water, "water"), _volume(scene, fat, "fat")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    fat_node.SetAndObserveTransformNodeID(shift.GetID())
    with pytest.raises(InputError, match="'fat' is under transform 'registration' and 'water' under no transform"):
        ql.maps_from_volume_nodes(water, reference_node=water_node, water_node=water_node, fat_node=fat_node)
    water_node.SetAndObserveTransformNodeID(shift.GetID())  # both under the same transform: measured as they lie
    maps = ql.maps_from_volume_nodes(water, reference_node=water_node, water_node=water_node, fat_node=fat_node)
    assert [m.name for m in maps] == ["fat_fraction"]


def test_a_t2_volume_with_nan_background_is_refused_unless_the_panel_says_nan_means_missing(scene):
    """The panel's "Leave out NaN voxels" reaches the maps through SlicerScene.maps_of on real volume nodes."""
    from DafneSlicerLib.controller import MapSelection
    from DafneSlicerLib.slicer_scene import SlicerScene

    water, labels = make_phantom("leg", contrast="water", **GEOMETRY)
    t2 = np.full(sitk.GetArrayViewFromImage(water).shape, np.nan)
    values = sitk.GetArrayViewFromImage(labels)
    t2[values > 0] = 30.0 + values[values > 0]  # a fitted T2 (ms) per muscle, NaN (no fit) everywhere else
    t2_image = sitk.GetImageFromArray(t2)
    t2_image.CopyInformation(water)
    water_node, t2_node = _volume(scene, water, "water"), _volume(scene, t2_image, "T2 fit")
    reference = mc.image_from_volume_node(water_node)
    labels.CopyInformation(reference)
    adapter = SlicerScene(scene)
    with pytest.raises(InputError, match="T2.*NaN"):
        adapter.maps_of(reference, water_node, MapSelection(others=[("T2", t2_node)]))
    maps = adapter.maps_of(reference, water_node, MapSelection(others=[("T2", t2_node)], nan_as_missing=True))
    rows = muscle_statistics(reference, labels, LEG, maps=maps, erode_mm=0.0)
    assert all(row["T2_mean"] == pytest.approx(30.0 + row["label_value"]) and row["T2_sd"] == pytest.approx(0.0)
               for row in rows)


def test_cross_sectional_area_table_and_plot(scene):
    _, labels = make_phantom("leg", **GEOMETRY)
    long_table, chart = ql.show_cross_sectional_areas(scene, labels, LEG, "calf CSA")
    columns = _table_columns(long_table)
    assert {"name", "position_mm", "area_mm2"} <= set(columns)
    assert chart.GetNumberOfPlotSeriesNodes() == 12  # every muscle of both legs is drawn
    plot = scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(0))
    assert plot.GetXColumnName() == "position_mm" and plot.GetYColumnName() == "right soleus"
    wide = _table_columns(plot.GetTableNode())
    soleus = [float(a) for a, name in zip(columns["area_mm2"], columns["name"], strict=True) if name == "right soleus"]
    assert [float(v) for v in wide["right soleus"]] == pytest.approx(soleus)
    # Again after the right soleus was erased: its series goes from the chart and from the scene.
    erased = sitk.Image(labels)
    erased = sitk.ChangeLabel(erased, {LEG.value_of(1, "right"): 0})
    _, chart = ql.show_cross_sectional_areas(scene, erased, LEG, "calf CSA")
    assert chart.GetNumberOfPlotSeriesNodes() == 11
    series = scene.GetNodesByClass("vtkMRMLPlotSeriesNode")
    assert series.GetNumberOfItems() == 11


def test_dicom_seg_export_of_a_volume_loaded_from_dicom(scene, tmp_path):
    image, labels = make_phantom("leg", (3, 64, 96), seed=7)
    write_dicom_series(image, tmp_path / "series")
    series = choose_dicom_series(tmp_path / "series")
    node = _volume(scene, read_image(tmp_path / "series"), "calf")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files]
    database = dict(zip(uids, series.files, strict=True))  # what slicer.dicomDatabase.fileForInstance answers
    labels.CopyInformation(mc.image_from_volume_node(node))
    with pytest.raises(InputError, match="not loaded from DICOM"):
        ql.export_dicom_seg(node, labels, LEG, str(tmp_path / "x.dcm"), database.get, model_name="leg",
                            model_version="2", corrected=True)
    node.SetAttribute(ql.DICOM_INSTANCE_UIDS_ATTRIBUTE, " ".join(uids))
    out = tmp_path / "calf.dcm"
    values = ql.export_dicom_seg(node, labels, LEG, str(out), database.get, model_name="leg", model_version="2",
                                 corrected=True)
    assert pydicom.dcmread(out).SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    np.testing.assert_array_equal(segment_numbers_as_labels(out, uids, values), sitk.GetArrayFromImage(labels))
    with pytest.raises(InputError, match="no longer in the DICOM database"):
        ql.export_dicom_seg(node, labels, LEG, str(tmp_path / "y.dcm"), lambda uid: "", model_name="leg",
                            model_version="2", corrected=False)
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "y.dcm").exists()
