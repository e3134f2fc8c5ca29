"""Preprocessing and its inverse: orientation, legs, crops, normalisation, exact restoration.

The phantom here is analytic in LPS patient coordinates (mm): two elliptic legs at x = -55 (the
patient's right, a little larger) and x = +55 (left), each with a fat ring, a dark bone and three
muscles: 1 lateral, 2 anterior-medial, 3 posterior-medial. Sampling it at the voxel centres of any
grid (flipped, permuted, oblique) gives the same physical object, so results compare physically.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core import preprocessing
from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import Code, LabelTable, Muscle
from dafne_logic.core.preprocessing import (
    NORMALISED_RANGE,
    LabelAssembler,
    PreprocessingParams,
    _resample_argmax,
    labels_to_onehot,
    prepare_volume,
    restore_labels,
)

TABLE = LabelTable(
    "test",
    tuple(Muscle(name, (i * 60, 100, 200), Code("SCT", str(i), name)) for i, name in enumerate(["lat", "ant", "post"], 1)),
)
N = TABLE.n_muscles
PARAMS = PreprocessingParams(spacing_mm=(1.0, 1.0), pad_multiple=16, margin_mm=10.0)
LEGS = {"right": (-55.0, 40.0, 45.0), "left": (55.0, 36.0, 42.0)}  # centre x, radius x, radius y (mm)
TOUCHING = {"right": (-37.0, 40.0, 45.0), "left": (37.0, 38.0, 43.0)}


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def grid(size_xyz, spacing_xyz, direction=None, centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty float image of this size and spacing whose centre sits at ``centre`` (mm)."""
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    d = np.asarray(np.eye(3) if direction is None else direction, dtype=float).reshape(3, 3)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetDirection(d.ravel().tolist())
    image.SetOrigin((np.asarray(centre) - d @ (np.asarray(spacing_xyz) * (np.asarray(size_xyz) - 1) / 2)).tolist())
    return image


def physical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical x, y, z (mm) of every voxel centre, each as a numpy (z, y, x) array."""
    k, j, i = np.indices(image.GetSize()[::-1], dtype=float)
    d = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    o = np.array(image.GetOrigin())
    return tuple(o[r] + d[r, 0] * i + d[r, 1] * j + d[r, 2] * k for r in range(3))  # type: ignore[return-value]


def phantom(reference: sitk.Image, legs=LEGS, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """The analytic phantom sampled on ``reference``'s grid: (float32 image, uint8 volume labels)."""
    x, y, z = physical(reference)
    image = np.zeros(x.shape)
    labels = np.zeros(x.shape, dtype=np.uint8)
    for side, (cx, ax, ay) in legs.items():
        grow = 1.0 + 0.004 * z  # the legs narrow along z, so slices differ
        u = (x - cx) * (-1.0 if side == "right" else 1.0)  # > 0 towards the lateral side of this leg
        r = ((x - cx) / (ax * grow)) ** 2 + (y / (ay * grow)) ** 2
        inner = ((x - cx) / (ax * grow - 6)) ** 2 + (y / (ay * grow - 6)) ** 2 <= 1
        ours = (x < 0) if side == "right" else (x >= 0)  # where touching legs overlap, x = 0 divides
        bone = (x - cx) ** 2 + y**2 < 8**2
        muscle = ours & inner & ~bone
        image[ours & (r <= 1)] = 1.0
        image[ours & bone] = 0.05
        classes = np.where(u > 10 + 0.3 * y, 1, np.where(y < 0.2 * u, 2, 3))  # boundaries oblique to the grid
        for c, level in ((1, 0.45), (2, 0.35), (3, 0.55)):
            region = muscle & (classes == c)
            image[region] = level
            labels[region] = TABLE.value_of(c, side)
    image += np.random.default_rng(seed).normal(0.0, 0.02, image.shape)
    out_image = sitk.GetImageFromArray((1000 * image).astype(np.float32))
    out_labels = sitk.GetImageFromArray(labels)
    for out in (out_image, out_labels):
        out.CopyInformation(reference)
    return out_image, out_labels


def reorient(image: sitk.Image, axes: tuple[int, int, int], flips: tuple[bool, ...]) -> sitk.Image:
    """The same physical image stored differently: numpy axes transposed, then some reversed."""
    array = sitk.GetArrayFromImage(image)
    d = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    size = np.array(image.GetSize())
    # new numpy axis n holds old numpy axis axes[n]; in SimpleITK order new axis a is old 2 - axes[2 - a]
    old_axis = [2 - axes[2 - a] for a in range(3)]
    columns = d[:, old_axis].copy()
    origin = np.array(image.GetOrigin())
    new = array.transpose(axes)
    for n, flip in enumerate(flips):
        if flip:
            a = 2 - n
            origin = origin + columns[:, a] * (size[old_axis[a]] - 1)
            columns[:, a] = -columns[:, a]
            new = np.flip(new, axis=n)
    spacing = np.linalg.norm(columns, axis=0)
    out = sitk.GetImageFromArray(np.ascontiguousarray(new))
    out.SetSpacing(spacing.tolist())
    out.SetDirection((columns / spacing).ravel().tolist())
    out.SetOrigin(origin.tolist())
    return out


def on_grid(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A label image resampled (nearest) onto ``reference``'s grid, as a numpy array."""
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())


def onehot_round_trip(image: sitk.Image, labels: sitk.Image, **kwargs) -> sitk.Image:
    prepared = prepare_volume(image, PARAMS, labels=labels, table=TABLE, **kwargs)
    probabilities = {leg.side: labels_to_onehot(leg.target, TABLE.n_classes) for leg in prepared.legs}
    return restore_labels(prepared, probabilities, TABLE)


def lateral_half_model(prepared) -> dict:
    """A stand-in network that sees only the image: it calls the foreground at smaller crop columns
    than its centre class 1, the rest class 2. Both crops look like right legs, whose lateral side
    lies at smaller canonical x, so class 1 must land on each leg's lateral side."""
    out = {}
    for leg in prepared.legs:
        foreground = leg.image > 0.3
        centre = np.nonzero(foreground)[2].mean()
        columns = np.arange(leg.image.shape[2])[None, None, :]
        classes = np.where(foreground, np.where(columns < centre, 1, 2), 0)
        out[leg.side] = labels_to_onehot(classes, TABLE.n_classes)
    return out


def check_lateral_halves(result: sitk.Image) -> None:
    """Class 1 / 2 of the lateral-half model sit on the physically right sides of each leg."""
    x, _, _ = physical(result)
    values = sitk.GetArrayFromImage(result)
    right_lateral, right_medial = x[values == 1].mean(), x[values == 2].mean()
    left_lateral, left_medial = x[values == 1 + N].mean(), x[values == 2 + N].mean()
    assert right_lateral < right_medial < 0 < left_medial < left_lateral


@pytest.fixture(scope="module")
def axial() -> tuple[sitk.Image, sitk.Image]:
    """Axial phantom at exactly the model spacing in-plane."""
    return phantom(grid((240, 150, 5), (1.0, 1.0, 4.0)))


def test_crops_have_model_shape_and_sides(axial):
    prepared = prepare_volume(axial[0], PARAMS, labels=axial[1], table=TABLE)
    assert [leg.side for leg in prepared.legs] == ["right", "left"]
    assert [leg.mirrored for leg in prepared.legs] == [False, True]
    for leg in prepared.legs:
        n, h, w = leg.image.shape
        assert n == 5 and h % 16 == 0 and w % 16 == 0 and leg.image.dtype == np.float32
        assert NORMALISED_RANGE[0] <= leg.image.min() and leg.image.max() <= NORMALISED_RANGE[1]
        assert leg.target.shape == leg.image.shape and leg.target.dtype == np.uint8
        assert set(np.unique(leg.target)) == {0, 1, 2, 3}
        # each crop holds one leg: about 96 mm wide with margins, not the whole 240 mm body
        assert w * PARAMS.spacing_mm[1] < 140
    # the right leg is the larger one in the phantom: geometry, not array order, decides
    assert (prepared.leg("right").target > 0).sum() > (prepared.leg("left").target > 0).sum()


def test_left_leg_is_mirrored_to_look_like_a_right_leg(axial):
    prepared = prepare_volume(axial[0], PARAMS, labels=axial[1], table=TABLE)
    for leg in prepared.legs:
        columns = np.nonzero(leg.target)[2]
        classes = leg.target[np.nonzero(leg.target)]
        # lateral muscle (1) at smaller crop columns than the medial ones in both crops
        assert columns[classes == 1].mean() + 15 < columns[classes > 1].mean()


def test_round_trip_is_exact_at_model_spacing(axial):
    restored = onehot_round_trip(*axial)
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(axial[1]))
    assert restored.GetOrigin() == axial[1].GetOrigin() and restored.GetSpacing() == axial[1].GetSpacing()
    assert restored.GetDirection() == axial[1].GetDirection()
    assert restored.GetPixelID() == sitk.sitkUInt8


def test_round_trip_with_resampling_keeps_dice():
    image, labels = phantom(grid((260, 140, 4), (0.8, 1.25, 5.0)))
    prepared = prepare_volume(image, PARAMS, labels=labels, table=TABLE)
    assert prepared.legs[0].rows.step == pytest.approx(0.8) and prepared.legs[0].columns.step == pytest.approx(1.25)
    restored = sitk.GetArrayFromImage(onehot_round_trip(image, labels))
    truth = sitk.GetArrayFromImage(labels)
    for value in range(1, 2 * N + 1):
        assert dice(restored, truth, value) >= 0.98, value


@pytest.mark.parametrize(
    "axes, flips",
    [
        ((0, 1, 2), (False, False, True)),  # x flipped: patient right now at the array's high x
        ((0, 1, 2), (True, True, False)),
        ((2, 0, 1), (False, False, False)),  # slices stored along another axis (sagittal-like)
        ((1, 2, 0), (True, False, True)),
    ],
)
def test_reoriented_inputs_give_the_same_physical_segmentation(axial, axes, flips):
    image, labels = reorient(axial[0], axes, flips), reorient(axial[1], axes, flips)
    assert np.array_equal(on_grid(labels, axial[1]), sitk.GetArrayFromImage(axial[1]))  # same physical object
    restored = onehot_round_trip(image, labels)
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels))
    reference = restore_labels(prepare_volume(*axial[:1], PARAMS), lateral_half_model(prepare_volume(axial[0], PARAMS)), TABLE)
    prepared = prepare_volume(image, PARAMS)
    result = restore_labels(prepared, lateral_half_model(prepared), TABLE)
    check_lateral_halves(result)
    assert np.array_equal(on_grid(result, reference), sitk.GetArrayFromImage(reference))


def test_inverse_mapping_undoes_dicom_orient(axial):
    for axes, flips in [((2, 1, 0), (True, False, True)), ((1, 0, 2), (False, True, False))]:
        image = reorient(axial[0], axes, flips)
        prepared = prepare_volume(image, PARAMS)
        oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        assert np.array_equal(prepared.to_input_array(oriented), sitk.GetArrayFromImage(image))


def test_oblique_volume_matches_axial_original(axial):
    reference = grid((240, 150, 5), (1.0, 1.0, 4.0))
    image, labels = phantom(grid((240, 150, 5), (1.0, 1.0, 4.0), rotation_z(10.0)))
    restored = onehot_round_trip(image, labels)
    physical_result = on_grid(restored, reference)
    truth = sitk.GetArrayFromImage(axial[1])
    for value in range(1, 2 * N + 1):
        assert dice(physical_result, truth, value) >= 0.9, value
    prepared = prepare_volume(image, PARAMS)
    check_lateral_halves(restore_labels(prepared, lateral_half_model(prepared), TABLE))


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_leg_volume_takes_its_side_from_geometry(side):
    image, labels = phantom(grid((160, 150, 3), (1.0, 1.0, 4.0)), legs={side: LEGS[side]})
    for variant in (lambda im: im, lambda im: reorient(im, (0, 1, 2), (False, False, True))):
        prepared = prepare_volume(variant(image), PARAMS)
        assert [leg.side for leg in prepared.legs] == [side]
    restored = onehot_round_trip(image, labels)
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels))
    # a field of view off the patient's midline puts the leg in the other half of the array
    off_centre = grid((160, 150, 3), (1.0, 1.0, 4.0), centre=(LEGS[side][0] * 2.2, 0.0, 0.0))
    prepared = prepare_volume(phantom(off_centre, legs={side: LEGS[side]})[0], PARAMS)
    assert [leg.side for leg in prepared.legs] == [side]


def test_one_leg_side_can_be_given():
    image, _ = phantom(grid((160, 150, 3), (1.0, 1.0, 4.0)), legs={"left": LEGS["left"]})
    prepared = prepare_volume(image, PARAMS, single_leg_side="right")
    assert [leg.side for leg in prepared.legs] == ["right"] and not prepared.legs[0].mirrored
    both = prepare_volume(phantom(grid((240, 150, 2), (1.0, 1.0, 4.0)))[0], PARAMS, single_leg_side="left")
    assert [leg.side for leg in both.legs] == ["right", "left"]  # ignored when two legs are found


def test_touching_legs_are_split():
    image, labels = phantom(grid((220, 150, 4), (1.0, 1.0, 4.0)), legs=TOUCHING)
    prepared = prepare_volume(image, PARAMS, labels=labels, table=TABLE)
    assert [leg.side for leg in prepared.legs] == ["right", "left"]
    canonical_labels = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
    for leg in prepared.legs:
        y0, y1, x0, x1 = leg.box
        mine = canonical_labels[:, y0:y1, x0:x1][:, leg.owned]
        values = set(np.unique(mine)) - {0}
        expected = {TABLE.value_of(i, leg.side) for i in range(1, N + 1)}
        assert values == expected
        assert leg.image.shape[2] * PARAMS.spacing_mm[1] < 130  # one leg and its margin, not both
    restored = onehot_round_trip(image, labels)
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels))


def test_each_crop_knows_which_of_its_pixels_reach_the_label_map():
    """``owned_on_crop``: touching legs at the model's spacing (one crop pixel per canonical pixel):
    exactly the pixels the leg owns, mirrored with the left crop; at half the resolution, a quarter."""
    image, _ = phantom(grid((220, 150, 4), (1.0, 1.0, 4.0)), legs=TOUCHING)
    prepared = prepare_volume(image, PARAMS)
    for leg in prepared.legs:
        mask = leg.owned_on_crop()
        assert mask.shape == leg.image.shape[1:]
        assert mask.sum() == leg.owned.sum() and 0 < mask.sum() < mask.size  # the other leg's side is not this leg's
        # Back through the restoration's own resampling, the crop mask lands on the owned pixels.
        restored = _resample_argmax(labels_to_onehot(mask[None].astype(np.uint8), 2), leg)[0]
        assert np.array_equal(restored.astype(bool), leg.owned)
    coarse = prepare_volume(image, PreprocessingParams(spacing_mm=(2.0, 2.0), pad_multiple=16, margin_mm=10.0))
    for leg in coarse.legs:
        assert leg.owned_on_crop().sum() == pytest.approx(leg.owned.sum() / 4, rel=0.05)


def test_single_slice_volume():
    image, labels = phantom(grid((384, 324, 1), (0.6, 0.6, 5.0)))
    assert sitk.GetArrayViewFromImage(image).shape == (1, 324, 384)
    prepared = prepare_volume(image, PARAMS, labels=labels, table=TABLE)
    assert [leg.side for leg in prepared.legs] == ["right", "left"]
    assert all(leg.image.shape[0] == 1 for leg in prepared.legs)
    restored = sitk.GetArrayFromImage(onehot_round_trip(image, labels))
    truth = sitk.GetArrayFromImage(labels)
    for value in range(1, 2 * N + 1):
        assert dice(restored, truth, value) >= 0.98, value


def test_normalisation_ignores_intensity_scale_and_offset(axial):
    image = axial[0]
    first = prepare_volume(image, PARAMS)
    second = prepare_volume(sitk.Cast(image * 7.0 + 100.0, sitk.sitkFloat32), PARAMS)
    for a, b in zip(first.legs, second.legs):
        assert a.image.shape == b.image.shape
        assert np.abs(a.image - b.image).max() < 1e-4
    # and it is a real normalisation: muscle (0.35..0.55 of the fat signal) sits between air and fat
    leg = prepare_volume(image, PARAMS, labels=axial[1], table=TABLE).leg("right")
    assert 0.25 < np.median(leg.image[leg.target > 0]) < 0.65
    assert np.median(leg.image[:, :4, :]) < 0.05  # air at the crop's edge


def test_integer_images_are_accepted(axial):
    as_float = prepare_volume(axial[0], PARAMS)
    as_int16 = prepare_volume(sitk.Cast(axial[0], sitk.sitkInt16), PARAMS)
    for a, b in zip(as_float.legs, as_int16.legs):
        assert b.image.dtype == np.float32 and a.box == b.box
        assert np.abs(a.image - b.image).max() < 2e-3  # only the rounding to whole numbers differs
    assert np.array_equal(sitk.GetArrayFromImage(onehot_round_trip(sitk.Cast(axial[0] + 200, sitk.sitkUInt16), axial[1])),
                          sitk.GetArrayFromImage(axial[1]))


def test_streamed_chunks_equal_one_call(axial, monkeypatch):
    prepared = prepare_volume(axial[0], PARAMS, labels=axial[1], table=TABLE)
    probabilities = {leg.side: labels_to_onehot(leg.target, TABLE.n_classes).astype(np.float16) for leg in prepared.legs}
    whole = sitk.GetArrayFromImage(restore_labels(prepared, probabilities, TABLE))
    monkeypatch.setattr(preprocessing, "RESTORE_CHUNK_ELEMENTS", 1000)  # one slice per chunk
    assembler = LabelAssembler(prepared, TABLE)
    for side, p in probabilities.items():
        for start in range(0, p.shape[0], 2):
            assembler.add(side, start, p[start : start + 2])
    assert np.array_equal(sitk.GetArrayFromImage(assembler.image()), whole)
    assert np.array_equal(whole, sitk.GetArrayFromImage(axial[1]))


def test_soft_probabilities_take_the_most_likely_class(axial):
    prepared = prepare_volume(axial[0], PARAMS, labels=axial[1], table=TABLE)
    probabilities = {}
    for leg in prepared.legs:
        p = 0.7 * labels_to_onehot(leg.target, TABLE.n_classes) + 0.3 / TABLE.n_classes
        probabilities[leg.side] = p
    restored = restore_labels(prepared, probabilities, TABLE)
    assert np.array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(axial[1]))


def test_restore_picks_the_winner_of_bilinear_interpolation():
    """Against a plain reference: interpolate every class everywhere, take the argmax."""
    image, _ = phantom(grid((150, 100, 2), (0.7, 1.3, 5.0)))
    prepared = prepare_volume(image, PARAMS)
    rng = np.random.default_rng(1)
    probabilities = {leg.side: rng.random((2, TABLE.n_classes, *leg.image.shape[1:]), dtype=np.float32) for leg in prepared.legs}
    result = sitk.GetArrayFromImage(sitk.DICOMOrient(restore_labels(prepared, probabilities, TABLE), "LPS"))
    for leg in prepared.legs:
        y0, y1, x0, x1 = leg.box
        rows, cols = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
        crop_rows = (rows - leg.rows.start) / leg.rows.step
        crop_cols = (cols - leg.columns.start) / leg.columns.step
        if leg.mirrored:
            crop_cols = leg.image.shape[2] - 1 - crop_cols
        for z in range(2):
            interpolated = np.stack(
                [ndimage.map_coordinates(p, [crop_rows, crop_cols], order=1, mode="nearest") for p in probabilities[leg.side][z]]
            )
            expected = np.array([0] + [TABLE.value_of(i, leg.side) for i in range(1, N + 1)])[interpolated.argmax(axis=0)]
            got = result[z, y0:y1, x0:x1]
            assert np.array_equal(got[leg.owned], expected[leg.owned])


def test_labels_to_onehot():
    classes = np.array([[[0, 2], [1, 3]]], dtype=np.uint8)
    onehot = labels_to_onehot(classes, 4)
    assert onehot.shape == (1, 4, 2, 2) and onehot.dtype == np.float32
    assert np.array_equal(onehot.argmax(axis=1), classes) and np.all(onehot.sum(axis=1) == 1)


def test_bad_inputs_raise_input_error(axial):
    image, labels = axial
    with pytest.raises(InputError, match="3D"):
        prepare_volume(image[:, :, 0], PARAMS)
    with pytest.raises(InputError, match="scalar"):
        prepare_volume(sitk.Compose(image, image), PARAMS)
    with pytest.raises(InputError, match="constant"):
        prepare_volume(sitk.Image(20, 20, 3, sitk.sitkFloat32) + 5.0, PARAMS)
    broken = sitk.GetArrayFromImage(image)
    broken[2, 10, 10] = np.nan
    nan_image = sitk.GetImageFromArray(broken)
    nan_image.CopyInformation(image)
    with pytest.raises(InputError, match="NaN"):
        prepare_volume(nan_image, PARAMS)
    shifted = sitk.Image(labels)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        prepare_volume(image, PARAMS, labels=shifted, table=TABLE)
    with pytest.raises(InputError, match="outside 0..6"):
        prepare_volume(image, PARAMS, labels=labels * 3, table=TABLE)
    with pytest.raises(ValueError, match="probabilities"):
        prepared = prepare_volume(image, PARAMS)
        restore_labels(prepared, {"right": np.zeros((5, 4, 16, 16), np.float32)}, TABLE)
