"""Fat fraction, parametric maps, edge erosion and per-muscle summaries against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_io_support import make_image

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import LEG
from dafne_logic.core.quantitative import (
    DEFAULT_ERODE_MM,
    QuantitativeMap,
    check_map_name,
    dixon_fat_fraction,
    erode_labels_axially,
    erode_labels_in_plane,
    fat_fraction_from_dixon,
    fat_fraction_from_map,
    map_on_grid,
    parametric_map,
    quantitative_columns,
    summarise_by_label,
)
from dafne_logic.core.statistics import muscle_statistics, statistics_csv
from dafne_logic.phantoms.images import make_dixon_phantom, make_phantom, true_fat_fraction

RIGHT_SOLEUS, LEFT_SOLEUS = 1, 7


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _block_labels(reference: sitk.Image) -> sitk.Image:
    """Right soleus: a 9×9 square on every slice (rows/columns 2..10); left soleus: one voxel."""
    size_x, size_y, size_z = reference.GetSize()
    labels = np.zeros((size_z, size_y, size_x), np.uint8)
    labels[:, 2:11, 2:11] = RIGHT_SOLEUS
    labels[0, 13, 13] = LEFT_SOLEUS
    return _like(labels, reference)


def test_dixon_fat_fraction_is_percent_with_background_left_out():
    water = np.array([[[90.0, 0.0, 50.0, 0.3]]])
    fat = np.array([[[10.0, 100.0, 50.0, 0.2]]])
    percent = dixon_fat_fraction(water, fat)
    np.testing.assert_allclose(percent[0, 0, :3], [10.0, 100.0, 50.0])
    assert np.isnan(percent[0, 0, 3])  # W+F = 0.5, under 5 % of the 99th percentile (~100): noise over noise


def test_fat_fraction_map_scale_is_detected_and_refused_when_neither():
    reference = make_image(shape_zyx=(2, 8, 8), spacing=(1.0, 1.0, 3.0))
    fractions = np.random.default_rng(0).random((2, 8, 8))
    as_fraction = fat_fraction_from_map(_like(fractions, reference), reference)
    as_percent = fat_fraction_from_map(_like(100 * fractions, reference), reference)
    np.testing.assert_allclose(as_fraction.values, 100 * fractions)
    np.testing.assert_allclose(as_percent.values, 100 * fractions)
    assert "0–1" in as_fraction.note and "0–100" in as_percent.note
    with pytest.raises(InputError, match="rescale"):
        fat_fraction_from_map(_like(1000 * fractions, reference), reference)


def test_a_masked_percent_map_is_read_as_percent_though_most_of_it_is_zero():
    """A scanner map masked to a region of interest: its 99.5th percentile over all voxels is 0,
    which once made percent look like fractions (30 % read as 3000 %)."""
    reference = make_image(shape_zyx=(10, 40, 40), spacing=(1.0, 1.0, 3.0))
    masked = np.zeros((10, 40, 40))
    masked[4:6, 10:15, 10:15] = 30.0  # 50 of 16,000 voxels: under the top 0.5 %
    as_read = fat_fraction_from_map(_like(masked, reference), reference)
    assert np.nanmax(as_read.values) == pytest.approx(30.0) and "0–100" in as_read.note


def test_a_segmentation_without_muscle_is_not_blamed_on_the_map():
    reference = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    empty = _like(np.zeros((2, 16, 16), np.uint8), reference)
    t2 = parametric_map("T2", _like(np.full((2, 16, 16), 35.0), reference), reference)
    columns = quantitative_columns(empty, [t2], LEG)
    assert all(row["T2_mean"] is None for row in columns.values())
    far_map = parametric_map("T2", _like(np.full((2, 16, 16), np.nan), reference), reference)
    with pytest.raises(InputError, match="no value on any segmented muscle voxel"):  # muscle there, map not
        quantitative_columns(_block_labels(reference), [far_map], LEG)


@pytest.mark.parametrize("erode_mm", [-1.0, float("nan"), float("inf")])
def test_erosion_must_be_a_finite_non_negative_distance(erode_mm):
    with pytest.raises(InputError, match="non-negative number of mm"):
        erode_labels_in_plane(np.ones((1, 4, 4), np.uint8), (1.0, 1.0), erode_mm)


def test_negative_dixon_images_are_refused():
    reference = make_image(shape_zyx=(2, 8, 8))
    water = _like(np.ones((2, 8, 8)), reference)
    with pytest.raises(InputError, match="negative"):
        fat_fraction_from_dixon(water, _like(-np.ones((2, 8, 8)), reference), reference)


def test_a_map_on_another_grid_is_resampled_by_position_and_a_distant_one_refused():
    reference = make_image(shape_zyx=(3, 10, 10), spacing=(1.0, 1.0, 2.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    # A smooth map (value = x in mm) on a finer, shifted grid covering half of the reference.
    fine = sitk.Image(12, 24, 8, sitk.sitkFloat32)
    fine.SetSpacing((0.5, 0.5, 1.0))
    fine.SetOrigin((reference.GetOrigin()[0] + 4.0, reference.GetOrigin()[1], reference.GetOrigin()[2]))
    x_mm = fine.GetOrigin()[0] + 0.5 * np.arange(12)
    fine = _like(np.broadcast_to(x_mm, (8, 24, 12)).astype(np.float32), fine)
    values = map_on_grid(fine, reference, "T2")
    x_ref = reference.GetOrigin()[0] + np.arange(10)
    covered = (x_ref >= x_mm[0]) & (x_ref <= x_mm[-1])
    np.testing.assert_allclose(values[1, 3][covered], x_ref[covered], atol=1e-5)  # linear in x: exact
    assert np.isnan(values[1, 3][~covered]).all()  # outside the map: left out, not zero
    far = _like(np.ones((8, 24, 12), np.float32), fine)
    far.SetOrigin((500.0, 500.0, 500.0))
    with pytest.raises(InputError, match="does not overlap"):
        map_on_grid(far, reference, "T2")


def test_in_plane_erosion_removes_the_edge_ring_per_slice_never_along_z():
    labels = np.zeros((3, 11, 11), np.uint8)
    labels[:, 1:10, 1:10] = 5  # 9×9 square on each of 3 slices
    spacing = (1.0, 1.0)
    assert (erode_labels_in_plane(labels, spacing, 0.0) == labels).all()
    one = erode_labels_in_plane(labels, spacing, 1.0)
    assert (one == 5).sum(axis=(1, 2)).tolist() == [49, 49, 49]  # 7×7 left on every slice, first and last too
    two = erode_labels_in_plane(labels, (0.5, 0.5), 1.0)  # 1 mm at 0.5 mm pixels: two rings
    assert (two == 5).sum(axis=(1, 2)).tolist() == [25, 25, 25]
    # A square touching the volume's edge is eroded there too (outside the image is not muscle).
    edge = np.zeros((1, 5, 5), np.uint8)
    edge[0, :3, :3] = 2
    assert (erode_labels_in_plane(edge, spacing, 1.0) == 2).sum() == 1


def _tilted(degrees: float) -> tuple[float, ...]:
    """An LPS direction matrix turned ``degrees`` about the L axis (an oblique axial acquisition)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c)


@pytest.mark.parametrize("stored_as", ["LPS", "LSP", "ASL", "RAI", "PIL"])
@pytest.mark.parametrize("tilt", [0.0, 12.0])
def test_erosion_cuts_the_axial_cross_section_however_the_volume_is_stored(stored_as, tilt):
    # A 9 × 7 mm (L × P) muscle running 6 slices along S, at 1 × 1 × 3 mm.
    voxels = np.zeros((8, 11, 13), np.uint8)
    voxels[1:7, 2:9, 2:11] = 5
    axial = sitk.GetImageFromArray(voxels)
    axial.SetSpacing((1.0, 1.0, 3.0))
    axial.SetDirection(_tilted(tilt))
    stored = sitk.DICOMOrient(axial, stored_as)  # the same voxels, another axis order and sign
    eroded = sitk.GetImageFromArray(erode_labels_axially(stored, 1.0))
    eroded.CopyInformation(stored)
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(eroded, "LPS"))
    # One ring off every axial slice (7 × 5 left on all 6 of them), never a slice at the muscle's ends.
    assert (back == 5).sum(axis=(1, 2)).tolist() == [0, 35, 35, 35, 35, 35, 35, 0]
    assert np.array_equal(back, erode_labels_in_plane(voxels, (1.0, 1.0), 1.0))
    # And so in the statistics: the same voxels measured, whatever the storage.
    ones = QuantitativeMap("fat_fraction", np.ones(sitk.GetArrayViewFromImage(stored).shape), "test")
    assert quantitative_columns(stored, [ones], LEG, erode_mm=1.0)[5]["fat_fraction_voxels"] == 6 * 35


def test_summaries_skip_nan_and_count_voxels():
    values = np.array([1.0, 2.0, 3.0, np.nan, 10.0])
    labels = np.array([1, 1, 1, 1, 2])
    summary = summarise_by_label(values, labels, 3)
    assert summary[1] == {"mean": 2.0, "median": 2.0, "sd": 1.0, "voxels": 3}
    assert summary[2] == {"mean": 10.0, "median": 10.0, "sd": None, "voxels": 1}
    assert summary[3] == {"mean": None, "median": None, "sd": None, "voxels": 0}


def test_statistics_gain_fat_fraction_and_map_columns_after_erosion():
    reference = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    labels = _block_labels(reference)
    # Fat fraction 20 % inside the soleus, 80 % on its outline ring (partial volume with fat).
    water, fat = np.full((2, 16, 16), 80.0), np.full((2, 16, 16), 20.0)
    ring = np.zeros((2, 16, 16), bool)
    ring[:, 2:11, 2:11] = True
    ring[:, 3:10, 3:10] = False
    water[ring], fat[ring] = 20.0, 80.0
    t2 = np.full((2, 16, 16), 35.0)
    maps = [fat_fraction_from_dixon(_like(water, reference), _like(fat, reference), reference),
            parametric_map("T2", _like(t2, reference), reference)]
    rows = {row["label_value"]: row for row in muscle_statistics(reference, labels, LEG, maps=maps, erode_mm=1.0)}
    soleus = rows[RIGHT_SOLEUS]
    assert soleus["fat_fraction_mean"] == pytest.approx(20.0) and soleus["fat_fraction_sd"] == pytest.approx(0.0)
    assert soleus["fat_fraction_voxels"] == 2 * 49  # 7×7 interior on both slices
    assert soleus["T2_mean"] == pytest.approx(35.0) and soleus["T2_median"] == pytest.approx(35.0)
    assert rows[LEFT_SOLEUS]["fat_fraction_voxels"] == 0 and rows[LEFT_SOLEUS]["fat_fraction_mean"] is None
    # Without erosion the ring biases the mean: (49·20 + 32·80) / 81.
    plain = {row["label_value"]: row for row in muscle_statistics(reference, labels, LEG, maps=maps, erode_mm=0.0)}
    assert plain[RIGHT_SOLEUS]["fat_fraction_mean"] == pytest.approx((49 * 20 + 32 * 80) / 81)
    header = statistics_csv(list(rows.values())).splitlines()[0].split(",")
    assert header[-7:] == ["fat_fraction_mean", "fat_fraction_median", "fat_fraction_sd", "fat_fraction_voxels",
                           "T2_mean", "T2_median", "T2_sd"]
    assert header.index("max_csa_mm2") < header.index("fat_fraction_mean")


def test_a_map_that_misses_every_muscle_is_refused():
    reference = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    labels = _block_labels(reference)
    values = np.full((2, 16, 16), np.nan)
    with pytest.raises(InputError, match="no value on any segmented muscle"):
        quantitative_columns(labels, [QuantitativeMap("T2", values, "")], LEG)


@pytest.mark.parametrize("name", ["T2", "water_T2", "ADC"])
def test_good_map_names(name):
    assert check_map_name(name, {"fat_fraction"}) == name


@pytest.mark.parametrize("name", ["2T", "T2 map", "T2-w", "fat_fraction", "t2", ""])
def test_bad_or_clashing_map_names_are_refused(name):
    with pytest.raises(InputError):
        check_map_name(name, {"fat_fraction", "T2"})


def test_phantom_dixon_pair_measures_its_true_fat_fraction():
    """Water and fat phantoms of one seed: the measured per-muscle fat fraction on the exact labels
    is the fat the phantom drew (blur, bias and noise included), within one percentage point."""
    geometry = dict(shape=(4, 192, 224), fat_infiltration=0.3, seed=3)
    water, labels = make_phantom("leg", contrast="water", **geometry)
    fat, fat_labels = make_phantom("leg", contrast="fat", **geometry)
    assert (sitk.GetArrayViewFromImage(labels) == sitk.GetArrayViewFromImage(fat_labels)).all()
    truth_map, truth = true_fat_fraction("leg", **geometry)
    assert truth_map.GetSize() == water.GetSize()
    spread = np.ptp(list(truth.values()))
    assert spread > 20  # muscles differ: a test that could pass by a constant would not
    maps = [fat_fraction_from_dixon(water, fat, water)]
    rows = muscle_statistics(water, labels, LEG, maps=maps, erode_mm=DEFAULT_ERODE_MM)
    errors = [row["fat_fraction_mean"] - truth[row["label_value"]] for row in rows if row["label_value"] in truth]
    assert len(errors) == len(truth) >= 10
    assert np.mean(np.abs(errors)) < 1.0 and np.max(np.abs(errors)) < 3.0
    # Without infiltration, muscle is 0.08 / (1 + 0.08) fat in these proton-density tables.
    _, lean = true_fat_fraction("leg", shape=(4, 192, 224), seed=3)
    assert min(lean.values()) == pytest.approx(100 * 0.08 / 1.08, abs=0.01)


def test_dixon_phantom_is_the_two_contrasts_and_the_truth_of_one_seed():
    """``make_dixon_phantom`` builds the anatomy once and gives exactly the arrays the three calls give."""
    geometry = dict(shape=(3, 192, 224), fat_infiltration=0.3, seed=4)
    pair = make_dixon_phantom("thigh", **geometry)
    water, labels = make_phantom("thigh", contrast="water", **geometry)
    fat, _ = make_phantom("thigh", contrast="fat", **geometry)
    for made, expected in ((pair.water, water), (pair.fat, fat), (pair.labels, labels)):
        assert np.array_equal(sitk.GetArrayViewFromImage(made), sitk.GetArrayViewFromImage(expected))
        assert made.GetOrigin() == expected.GetOrigin() and made.GetSpacing() == expected.GetSpacing()
    assert pair.true_fat_fraction == true_fat_fraction("thigh", **geometry)[1]


@pytest.mark.parametrize("direction", [
    # Halfway between axes (45° about S, then 45° about L): DICOMOrient to LPS and back to the
    # original code does not undo itself here.
    tuple((np.array([[1, 0, 0], [0, 0.5 ** 0.5, -(0.5 ** 0.5)], [0, 0.5 ** 0.5, 0.5 ** 0.5]])
           @ np.array([[0.5 ** 0.5, -(0.5 ** 0.5), 0], [0.5 ** 0.5, 0.5 ** 0.5, 0], [0, 0, 1]])).ravel()),
    (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0),  # left-handed (determinant -1), coronal
])
def test_erosion_puts_the_labels_back_on_their_own_grid_for_awkward_directions(direction):
    voxels = np.zeros((4, 6, 6), np.uint8)
    voxels[:, 1:5, 1:5] = 1
    voxels[1:3, 0:2, 4:6] = 2
    image = sitk.GetImageFromArray(voxels)
    image.SetDirection(direction)
    assert np.array_equal(erode_labels_axially(image, 0.0), voxels)  # no erosion: every voxel where it was
    eroded = erode_labels_axially(image, 1.0)
    assert eroded.shape == voxels.shape and set(np.unique(eroded)) <= {0, 1, 2}
    assert ((eroded > 0) <= (voxels > 0)).all() and (eroded == voxels)[eroded > 0].all()  # only ever removes


def test_errors_name_the_right_image_and_the_right_reason():
    reference = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    labels = _block_labels(reference)
    water = _like(np.full((2, 16, 16), 80.0), reference)
    far_fat = _like(np.full((2, 16, 16), 20.0), reference)
    far_fat.SetOrigin((900.0, 900.0, 900.0))
    with pytest.raises(InputError, match="fat map does not overlap the image"):
        fat_fraction_from_dixon(water, far_fat, reference)
    with pytest.raises(InputError, match="water map does not overlap the image"):  # the one astray is named
        fat_fraction_from_dixon(far_fat, water, reference)
    axial = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    left, right = _like(np.full((2, 16, 16), 80.0), axial), _like(np.full((2, 16, 16), 20.0), axial)
    x, y, z = axial.GetOrigin()
    left.SetOrigin((x - 10.0, y, z))
    right.SetOrigin((x + 10.0, y, z))  # each overlaps the scan, not each other
    with pytest.raises(InputError, match="fat map does not overlap the water image"):
        fat_fraction_from_dixon(left, right, axial)
    # A parametric map has no noise floor: its values on the muscles are missing (failed fits).
    missing = QuantitativeMap("T2", np.full((2, 16, 16), np.nan), "T2 map")
    with pytest.raises(InputError, match=r"its values there are all missing\)") as error:
        quantitative_columns(labels, [missing], LEG)
    assert "noise floor" not in str(error.value)
    with pytest.raises(InputError, match="under its noise floor"):  # the Dixon fat fraction's
        quantitative_columns(labels, [QuantitativeMap("fat_fraction", np.full((2, 16, 16), np.nan), "ff",
                                                      noise_floor=True)], LEG)
    with pytest.raises(InputError, match=r"its values there are all missing\)"):  # a scanner's map has none
        quantitative_columns(labels, [QuantitativeMap("fat_fraction", np.full((2, 16, 16), np.nan), "ff")], LEG)


def test_cover_warnings_say_which_muscles_lack_values_and_why(caplog):
    """Right soleus (9×9 on both slices) has values on 4 of its 18 rows (22 %); left soleus (one voxel) none."""
    reference = make_image(shape_zyx=(2, 16, 16), spacing=(1.0, 1.0, 4.0))
    labels = _block_labels(reference)
    values = np.full((2, 16, 16), np.nan)
    values[1, :6] = 40.0
    values[1, 2, 2] = 60.0
    warnings: list[str] = []
    quantitative_columns(labels, [QuantitativeMap("T2", values, "T2 map")], LEG, erode_mm=0.0, warnings=warnings)
    assert warnings == [
        "T2: no value left in left soleus (outside the map, or its values there are missing); their cells are empty",
        "T2: values on under 50 % of the voxels measured in right soleus (22 %) (the map covers part of them, or its "
        "values there are missing); their figures describe that part only"]
    dixon: list[str] = []
    quantitative_columns(labels, [QuantitativeMap("fat_fraction", values, "ff", noise_floor=True)], LEG, erode_mm=1.0,
                         warnings=dixon)
    assert "eroded away by the 1 mm erosion" in dixon[0] and "or they lie under its noise floor" in dixon[0]
    with caplog.at_level("WARNING"):  # a caller that collects none: logged, not lost
        quantitative_columns(labels, [QuantitativeMap("T2", values, "T2 map")], LEG, erode_mm=0.0)
    assert "no value left in left soleus" in caplog.text and "right soleus (22 %)" in caplog.text
