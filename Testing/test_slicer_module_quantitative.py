"""The controller's quantitative actions (maps in the statistics, fat-fraction chart, CSA, DICOM SEG export)
with the scene faked as in test_slicer_module_controller; the numbers come from the real dafne_logic code.
The MRML side (volume nodes, chart and table nodes, DICOM database) is tested with slicer-core in
slicer_core/test_slicer_core_quantitative.py."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from fakes import FakeScene, Node, automatic_labels, finish, make_controller, make_volume

from dafne_logic.core.quantitative import build_maps
from DafneSlicerLib.controller import MapSelection


class QuantitativeScene(FakeScene):
    """FakeScene plus the quantitative methods: maps from the nodes' images, charts and exports recorded."""

    def __init__(self):
        super().__init__()
        self.charts, self.areas, self.exports = [], [], []

    def maps_of(self, reference, volume_node, selection):
        assert volume_node is not None and volume_node.image is reference  # the transform check needs the image's node
        def image(node):
            return None if node is None else node.image

        return build_maps(reference, water=image(selection.water), fat=image(selection.fat),
                          fat_fraction=image(selection.fat_fraction),
                          others=[(name, node.image) for name, node in selection.others])

    def show_fat_fraction_chart(self, rows, table, name):
        self.charts.append((name, rows))

    def show_cross_sectional_areas(self, labels, table, name):
        self.areas.append((name, sitk.GetArrayFromImage(labels)))

    def export_dicom_seg(self, volume_node, labels, table, path, model_name, model_version, corrected):
        self.exports.append((path, model_name, model_version, corrected))
        return [1, 7]


def _segmented():
    controller, parts = make_controller(scene=QuantitativeScene())
    volume = make_volume()
    controller.segment(volume, "leg", "cpu")
    finish(controller)
    return controller, parts, volume


def _dixon(volume: Node, fat_percent: float) -> tuple[Node, Node]:
    """Water and fat volumes on the volume's grid with a uniform fat fraction (one background corner
    voxel differs: a constant volume is no image)."""
    def node(name, value):
        image = sitk.Image(volume.image.GetSize(), sitk.sitkFloat32) + value
        image.CopyInformation(volume.image)
        image[0, 0, 0] = 1.0
        return Node(name, image=image)

    return node("water", 100.0 - fat_percent), node("fat", fat_percent)


def test_statistics_with_dixon_volumes_add_fat_fraction_and_the_chart():
    controller, parts, volume = _segmented()
    water, fat = _dixon(volume, 30.0)
    controller.statistics(MapSelection(water=water, fat=fat, others=[("T2", volume)], erode_mm=0.0))
    assert parts["view"].errors == []
    _, rows = parts["scene"].tables[-1]
    soleus = next(r for r in rows if r["name"] == "right soleus")
    assert soleus["fat_fraction_mean"] == pytest.approx(30.0) and soleus["fat_fraction_voxels"] == 80
    assert soleus["T2_mean"] == pytest.approx(soleus["mean"])
    name, chart_rows = parts["scene"].charts[-1]
    assert name == "calf fat fraction" and chart_rows is rows
    assert "fat fraction" in parts["view"].statuses[-1]
    # Erosion reaches the statistics: 1 mm at 0.8 mm pixels removes the outline of the 4×4 squares.
    controller.statistics(MapSelection(water=water, fat=fat, erode_mm=1.0))
    soleus = next(r for r in parts["scene"].tables[-1][1] if r["name"] == "right soleus")
    assert soleus["fat_fraction_voxels"] == 5 * 2 * 2


@pytest.mark.parametrize("stored, detected", [(0.3, "fractions 0–1"), (30.0, "percent 0–100")])
def test_a_scanner_fat_fraction_map_is_read_on_its_detected_scale_and_the_status_says_which(stored, detected):
    controller, parts, volume = _segmented()
    image = sitk.Image(volume.image.GetSize(), sitk.sitkFloat32) + stored
    image.CopyInformation(volume.image)
    image[0, 0, 0] = stored / 3
    controller.statistics(MapSelection(fat_fraction=Node("ff", image=image), erode_mm=0.0))
    soleus = next(r for r in parts["scene"].tables[-1][1] if r["name"] == "right soleus")
    assert soleus["fat_fraction_mean"] == pytest.approx(30.0)
    assert f"read as {detected}" in parts["view"].statuses[-1]


def test_the_status_says_which_muscles_a_map_covers_in_part_or_not_at_all():
    """What the command line logs as warnings, Slicer says in the status line: a T2 map of one slice."""
    controller, parts, volume = _segmented()
    t2 = sitk.Cast(volume.image[:, :, :1], sitk.sitkFloat32)  # the first slice only, in place
    controller.statistics(MapSelection(others=[("T2", Node("t2", image=t2))], erode_mm=0.0))
    status = parts["view"].statuses[-1]
    assert parts["view"].errors == [] and "T2: values on under 50 % of the voxels measured in" in status
    controller.statistics(MapSelection(others=[("T2", volume)], erode_mm=0.0))
    assert "values on under" not in parts["view"].statuses[-1]


def test_statistics_without_maps_draw_no_chart_and_a_lone_water_volume_is_one_sentence():
    controller, parts, volume = _segmented()
    controller.statistics()
    assert parts["scene"].charts == [] and "fat_fraction_mean" not in parts["scene"].tables[-1][1][0]
    tables = len(parts["scene"].tables)
    water, _ = _dixon(volume, 30.0)
    controller.statistics(MapSelection(water=water))
    assert "go together" in parts["view"].errors[-1] and len(parts["scene"].tables) == tables


def test_dicom_seg_export_is_refused_up_front_where_highdicom_cannot_load(monkeypatch):
    import sys

    controller, parts, _ = _segmented()
    assert controller.can_export_dicom_seg() is True and not parts["view"].errors
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as in Slicer 5.10: pydicom 2 with numpy 2
    assert controller.can_export_dicom_seg() is False
    assert "needs pydicom 3" in parts["view"].errors[-1] and ".seg.nrrd" in parts["view"].errors[-1]


def test_cross_sectional_areas_and_dicom_seg_export_use_the_current_segmentation(tmp_path):
    controller, parts, _ = _segmented()
    controller.cross_sectional_areas()
    name, labels = parts["scene"].areas[-1]
    assert name == "calf cross-sectional area" and labels.any()
    controller.export_dicom_seg(str(tmp_path / "seg.dcm"))
    assert parts["scene"].exports[-1] == (str(tmp_path / "seg.dcm"), "leg", "1", False)
    case = controller.case
    case.segmentation_node.labels[2] = 0  # the user erases a slice: the export says SEMIAUTOMATIC
    controller.export_dicom_seg(str(tmp_path / "seg2.dcm"))
    assert parts["scene"].exports[-1][3] is True
    assert "2 muscles" in parts["view"].statuses[-1]


def test_a_saved_segmentation_taken_up_is_exported_as_corrected_not_automatic(tmp_path):
    """Taking up a saved (usually corrected) segmentation makes its content the baseline: with no edit
    in this session, the export declared it AUTOMATIC in a clinical object."""
    controller, parts = make_controller(scene=QuantitativeScene())
    volume = make_volume()
    controller.adopt(volume, Node("calf saved", labels=automatic_labels()), "leg")
    controller.export_dicom_seg(str(tmp_path / "seg.dcm"))
    assert not parts["view"].errors and parts["scene"].exports[-1][3] is True
