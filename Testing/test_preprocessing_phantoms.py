"""Preprocessing on the project's anatomical phantoms and on the two real calf slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.io import read_image, read_segmentation
from dafne_logic.core.labels import BUILTIN_TABLES, LEG
from dafne_logic.core.preprocessing import PreprocessingParams, labels_to_onehot, prepare_volume, restore_labels
from dafne_logic.phantoms.images import make_phantom

PARAMS = PreprocessingParams()


def round_trip_dice(image: sitk.Image, labels: sitk.Image, table) -> tuple[list[str], dict[int, float]]:
    """Sides of the crops, and the Dice per present label after prepare → one-hot targets → restore."""
    prepared = prepare_volume(image, PARAMS, labels=labels, table=table)
    restored = restore_labels(prepared, {leg.side: labels_to_onehot(leg.target, table.n_classes) for leg in prepared.legs}, table)
    a, b = sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels)
    dices = {}
    for value in np.unique(b[b > 0]):
        x, y = a == value, b == value
        dices[int(value)] = 2.0 * (x & y).sum() / (x.sum() + y.sum())
    return [leg.side for leg in prepared.legs], dices


@pytest.mark.parametrize(
    "region, contrast, touching",
    [("thigh", "t1", False), ("thigh", "water", False), ("thigh", "fat", True), ("leg", "t2", False), ("leg", "t1", True)],
)
def test_bilateral_phantoms(region, contrast, touching):
    table = BUILTIN_TABLES[region]
    image, labels = make_phantom(region, shape=(3, 288, 288), contrast=contrast, touching=touching, seed=2)
    sides, dices = round_trip_dice(image, labels, table)
    assert sides == ["right", "left"]
    assert len(dices) == 2 * table.n_muscles  # every muscle of both legs survives the round trip
    assert min(dices.values()) >= 0.98


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_leg_phantoms(side):
    image, labels = make_phantom("thigh", shape=(3, 288, 288), legs=side, seed=3)
    sides, dices = round_trip_dice(image, labels, BUILTIN_TABLES["thigh"])
    assert sides == [side]
    assert min(dices.values()) >= 0.98


@pytest.mark.parametrize("name", ["pd_example", "t1_example"])
def test_real_calf_slices(shared_data, name):
    """Real single-slice MR: both legs found, each label inside its own leg's crop, right side right."""
    folder = shared_data / "calf_slices"
    image = read_image(folder / f"{name}.nii.gz")
    labels, unknown = read_segmentation(folder / f"{name}_labels.nii.gz", LEG)
    assert unknown == []
    sides, dices = round_trip_dice(image, labels, LEG)
    assert sides == ["right", "left"]
    assert len(dices) == 2 * LEG.n_muscles and min(dices.values()) >= 0.98


@pytest.mark.parametrize("name", ["test_dseg_a", "test_dseg_b"])
def test_real_lower_body_anatomy_sides(shared_data, name):
    """Whole lower-body label maps stored in RAS: each crop's own region holds its side's muscles.

    There is no image, so the test draws one: labelled tissue at mid grey inside a bright shell.
    """
    folder = shared_data / "lowerbody_label_maps"
    scheme = json.loads((folder / "contrast_agnostic_wholebody_model_labels.json").read_text())
    side_of = {entry["value"]: entry["side"] for entry in scheme["labels"] if entry.get("side") in ("left", "right")}
    labels = sitk.ReadImage(str(folder / f"{name}.nii.gz"))[:, :, ::6]  # every 6th slice keeps it fast
    values = sitk.GetArrayFromImage(labels)
    tissue = values > 0
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(ndimage.binary_dilation(tissue, in_plane, iterations=3), in_plane)
    noise = np.random.default_rng(0).normal(0.0, 0.03, values.shape)
    image = sitk.GetImageFromArray((np.where(tissue, 0.5, np.where(body, 1.0, 0.0)) + noise).astype(np.float32))
    image.CopyInformation(labels)

    prepared = prepare_volume(image, PARAMS)
    assert [leg.side for leg in prepared.legs] == ["right", "left"]
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPS"))
    lookup = np.zeros(int(canonical.max()) + 1, dtype=np.int8)  # +1 right, -1 left, 0 neither
    for value, side in side_of.items():
        if value < lookup.size:
            lookup[value] = 1 if side == "right" else -1
    for leg in prepared.legs:
        y0, y1, x0, x1 = leg.box
        sides = lookup[canonical[:, y0:y1, x0:x1][:, leg.owned]]
        own = (sides == (1 if leg.side == "right" else -1)).sum()
        other = (sides == (-1 if leg.side == "right" else 1)).sum()
        assert own > 1000 and other < 0.01 * own


@pytest.mark.parametrize("padding", ["in-plane", "empty slices"])
def test_zero_padding_around_the_scan_keeps_the_legs_apart_and_on_their_sides(padding):
    """A scan resampled into a larger grid, or with slices outside its field of view, holds exact
    zeros beside its noisy air: thresholding must not take the air for body and merge the legs."""
    image, labels = make_phantom("leg", (4, 96, 128), contrast="t1", seed=2)
    array, truth = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    if padding == "in-plane":
        pad = ((0, 0), (40, 40), (40, 40))
        array, truth = np.pad(array, pad), np.pad(truth, pad)
        shift = 40
    else:
        array, truth = np.concatenate([array[:1], np.zeros_like(array[1:])]), np.concatenate([truth[:1], 0 * truth[1:]])
        shift = 0
    padded = sitk.GetImageFromArray(array)
    padded.SetSpacing(image.GetSpacing())
    origin, spacing = image.GetOrigin(), image.GetSpacing()
    padded.SetOrigin((origin[0] - shift * spacing[0], origin[1] - shift * spacing[1], origin[2]))
    padded_labels = sitk.GetImageFromArray(truth.astype(np.uint8))
    padded_labels.CopyInformation(padded)
    prepared = prepare_volume(padded, PreprocessingParams(), padded_labels, LEG)
    assert [leg.side for leg in prepared.legs] == ["right", "left"]
    for leg in prepared.legs:  # each crop holds its own leg's muscles (a wrong side would zero them)
        assert leg.target is not None and len(np.unique(leg.target)) == LEG.n_muscles + 1
