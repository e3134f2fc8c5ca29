"""Preprocessing on the project's anatomical phantoms and on the two real calf slices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.io import read_image, read_segmentation
from dafne_logic.labels import BUILTIN_TABLES, LEG
from dafne_logic.model_package import PreprocessingParams
from dafne_logic.phantoms import make_phantom
from dafne_logic.preprocessing import labels_to_onehot, prepare_volume, restore_labels

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
