"""Whole-volume inference: geometry, progress, cancellation, and Dice of the bundled models."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_model_package import tiny_package

from dafne_logic.core.errors import Cancelled
from dafne_logic.core.labels import LEG, THIGH
from dafne_logic.inference.model_package import load_model
from dafne_logic.inference.segment import segment_volume
from dafne_logic.learning.evaluation import dice_per_label, mean_dice
from dafne_logic.phantoms.images import make_phantom

# Phantom seeds ≥ 9000 are never used for training (training uses 1000+, validation 5000+).
UNSEEN_SEED = 9001


def _oblique_copy(image: sitk.Image) -> sitk.Image:
    """The same voxels with a flipped, permuted direction matrix (x flipped, array mirrored)."""
    array = sitk.GetArrayFromImage(image)[:, :, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    out.SetDirection(tuple(direction.ravel()))
    last_x = image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0))
    out.SetOrigin((last_x[0], image.GetOrigin()[1], image.GetOrigin()[2]))
    return out


def test_output_lies_on_the_input_grid_with_bilateral_values():
    image, _ = make_phantom("leg", shape=(3, 160, 200), seed=UNSEEN_SEED)
    image.SetOrigin((-40.0, 12.5, 300.0))
    labels = segment_volume(image, tiny_package(LEG), device="cpu")
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetDirection() == image.GetDirection()
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    assert values.min() >= 0 and values.max() <= 2 * LEG.n_muscles


def test_progress_reaches_one_and_cancel_stops_before_any_result():
    image, _ = make_phantom("leg", shape=(4, 128, 160), seed=UNSEEN_SEED)
    seen: list[float] = []
    segment_volume(image, tiny_package(LEG), device="cpu", batch_size=2, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        segment_volume(image, tiny_package(LEG), device="cpu", batch_size=1, cancel=cancel)


@pytest.mark.parametrize("region, table, threshold", [("thigh", THIGH, 0.80), ("leg", LEG, 0.80)])
def test_bundled_model_segments_an_unseen_phantom(region, table, threshold):
    image, truth = make_phantom(region, shape=(6, 432, 432), contrast="t2", seed=UNSEEN_SEED)
    predicted = segment_volume(image, load_model(region), device="cpu")
    scores = dice_per_label(predicted, truth, table)
    assert mean_dice(scores) >= threshold, scores
    # Both sides found, each on its own side: swapping sides would drop every Dice to ~0.
    assert min(scores[f"right {table.muscles[0].name}"], scores[f"left {table.muscles[0].name}"]) > 0.5


def _rotated_grid(image: sitk.Image, degrees: float) -> sitk.Image:
    """The image resampled onto a grid rotated by ``degrees`` about the z axis (an oblique scan)."""
    angle = np.deg2rad(degrees)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    reference = sitk.Image(image.GetSize(), image.GetPixelID())
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(tuple(direction.ravel()))
    half = direction @ (np.array(image.GetSpacing()) * (np.array(image.GetSize()) - 1) / 2)
    reference.SetOrigin(tuple(centre - half))
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


@pytest.mark.parametrize("reorient", ["flip_x", "permute"])
def test_flipped_or_permuted_volume_gives_the_same_physical_segmentation(reorient):
    image, _ = make_phantom("leg", shape=(3, 432, 432), seed=UNSEEN_SEED)
    model = load_model("leg")
    direct = segment_volume(image, model, device="cpu")
    moved = _oblique_copy(image) if reorient == "flip_x" else sitk.PermuteAxes(image, [2, 0, 1])
    result = segment_volume(moved, model, device="cpu")
    assert result.GetSize() == moved.GetSize()
    # Resample the result onto the original grid: identical physical labels expected.
    back = sitk.Resample(result, direct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayFromImage(direct), sitk.GetArrayFromImage(back)
    assert a.max() > 0
    assert np.mean(a == b) > 0.995


def test_oblique_volume_keeps_muscles_and_sides_in_place():
    image, truth = make_phantom("leg", shape=(3, 432, 432), seed=UNSEEN_SEED)
    oblique = _rotated_grid(image, 10.0)
    result = segment_volume(oblique, load_model("leg"), device="cpu")
    back = sitk.Resample(result, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    # Compare where the rotated grid covers the original field of view.
    covered = sitk.GetArrayFromImage(sitk.Resample(oblique, truth, sitk.Transform(), sitk.sitkLinear, 0.0)) > 0
    scores = dice_per_label(sitk.GetArrayFromImage(back) * covered, sitk.GetArrayFromImage(truth) * covered, LEG)
    assert mean_dice(scores) > 0.75, scores
    assert min(scores["right soleus"], scores["left soleus"]) > 0.5
