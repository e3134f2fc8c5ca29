"""Dice per volume label: values, NaN for labels absent from both maps, grid checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import LEG
from dafne_logic.learning.evaluation import dice_per_label, mean_dice


def test_dice_values_by_name_and_nan_when_absent():
    ref = np.zeros((1, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0:4, 0:5] = 1  # right soleus, 20 voxels
    pred[0, 0:4, 0:4] = 1  # 16 voxels, all inside
    ref[0, 6:8, 6:8] = LEG.value_of(4, "left")  # left tibialis anterior, missed entirely
    d = dice_per_label(pred, ref, LEG)
    assert list(d)[:2] == ["right soleus", "right gastrocnemius medialis"]
    assert d["right soleus"] == pytest.approx(2 * 16 / 36)
    assert d["left tibialis anterior"] == 0.0
    assert math.isnan(d["right peroneus"])
    assert mean_dice(d) == pytest.approx((2 * 16 / 36 + 0.0) / 2)


def test_images_and_arrays_agree_and_grids_are_checked():
    arr = np.zeros((2, 8, 8), np.uint8)
    arr[:, 2:6, 2:6] = 7  # left soleus
    a = sitk.GetImageFromArray(arr)
    b = sitk.GetImageFromArray(arr)
    assert dice_per_label(a, b, LEG)["left soleus"] == 1.0
    b.SetSpacing((2.0, 1.0, 1.0))
    with pytest.raises(InputError):
        dice_per_label(a, b, LEG)
    with pytest.raises(InputError):
        dice_per_label(arr, arr[:1], LEG)


def test_mean_of_nothing_is_nan():
    assert math.isnan(mean_dice({"a": math.nan}))
