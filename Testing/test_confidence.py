"""Per-muscle confidence: the tally's arithmetic, the same labels as ``segment_volume``, lower on
fat-infiltrated muscle, and the ``confidence``/``review`` columns of ``segment --stats``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dafne_logic.cli import main
from dafne_logic.core.labels import LEG
from dafne_logic.inference.confidence import (
    REVIEW_BELOW,
    Confidence,
    ConfidenceTally,
    add_confidence_columns,
    slices_on_input,
)
from dafne_logic.inference.model_package import load_model
from dafne_logic.inference.segment import segment_volume, segment_with_confidence
from dafne_logic.phantoms.images import make_phantom


def _probabilities(winner: int, top: float, second: float, shape=(1, 2, 2)) -> np.ndarray:
    """(k, C, H, W) probabilities: class ``winner`` at ``top``, class 0 (or 1) at ``second``, rest shared."""
    p = np.full((shape[0], LEG.n_classes, *shape[1:]), (1 - top - second) / (LEG.n_classes - 2), np.float32)
    p[:, winner] = top
    p[:, 1 if winner == 0 else 0] = second
    return p


def test_tally_averages_the_top_two_margin_per_volume_label_and_skips_slices_without_body():
    tally = ConfidenceTally(LEG, slices_with_body=np.array([True, True, False]))
    tally.add("right", 0, _probabilities(3, 0.9, 0.05))  # margin 0.85 on 4 pixels of right muscle 3
    tally.add("left", 0, np.concatenate([_probabilities(3, 0.5, 0.3), _probabilities(3, 0.9, 0.1)]))  # 0.2 and 0.8
    tally.add("left", 2, _probabilities(3, 0.4, 0.35))  # no body on slice 2: not counted
    scores = tally.per_label()
    assert scores[3] == pytest.approx(0.85)
    assert scores[3 + LEG.n_muscles] == pytest.approx(0.5)  # mean of 0.2 and 0.8, right→left value mapped
    assert set(scores) == {3, 3 + LEG.n_muscles}  # background and unpredicted muscles: no entry
    # Per slice, over both legs' muscle pixels: slice 0 holds 0.85 (right) and 0.2 (left), 4 pixels each.
    assert tally.per_canonical_slice() == pytest.approx({0: 0.525, 1: 0.8})


def test_tally_scores_only_the_crop_pixels_that_reach_the_label_map():
    """A crop also shows the other leg and a margin; pixels outside ``owned`` count for nothing."""
    owned = np.array([[True, False], [True, False]])
    probabilities = np.concatenate([_probabilities(3, 0.9, 0.05, (1, 2, 1)),  # column 0: margin 0.85
                                    _probabilities(3, 0.5, 0.4, (1, 2, 1))], axis=3)  # column 1: margin 0.1
    tally = ConfidenceTally(LEG, slices_with_body=None, crop_masks={"right": owned})
    tally.add("right", 0, probabilities)
    tally.add("left", 0, probabilities)  # no mask for this side: every pixel
    scores = tally.per_label()
    assert scores[3] == pytest.approx(0.85)
    assert scores[3 + LEG.n_muscles] == pytest.approx(0.475)
    assert tally.per_canonical_slice() == pytest.approx({0: (2 * 0.85 + 2 * 0.85 + 2 * 0.1) / 6})
    with pytest.raises(ValueError, match="owned_on_crop"):  # a box-shaped mask is the wrong one
        ConfidenceTally(LEG, None, crop_masks={"right": np.ones((3, 3), bool)}).add("right", 0, probabilities)


def test_canonical_slices_become_the_input_slices_when_the_input_is_axial():
    values = {0: 0.5, 3: 0.9}
    assert slices_on_input(values, (0, 1, 2), (False, False, False), 10) == values
    assert slices_on_input(values, (0, 1, 2), (True, False, False), 10) == {9: 0.5, 6: 0.9}  # feet-first slice order
    assert slices_on_input(values, (1, 0, 2), (False, False, False), 10) == {}  # k is not the axial axis
    assert Confidence(per_slice={4: 0.9, 7: 0.5, 2: 0.6, 5: 0.95}).least_sure_slices(2) == [2, 7]
    assert Confidence(per_slice={0: 0.9, 1: 0.5, 2: 0.6}).least_sure_slices(3) == []  # nothing to choose between


def test_the_least_sure_slice_is_the_one_the_image_spoils():
    """Strong noise on one slice of a phantom: that slice is where the network is least sure."""
    image, _ = make_phantom("leg", shape=(5, 432, 432), seed=9012)
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    voxels[3] += np.random.default_rng(0).normal(0.0, 0.6 * float(voxels.std()), voxels[3].shape).astype(np.float32)
    spoiled = sitk.GetImageFromArray(np.clip(voxels, 0, None))
    spoiled.CopyInformation(image)
    _, confidence = segment_with_confidence(spoiled, load_model("leg"), device="cpu")
    assert sorted(confidence.per_slice) == [0, 1, 2, 3, 4]
    assert confidence.least_sure_slices(1) == [3]


def test_review_column_marks_low_confidence_and_leaves_absent_muscles_empty():
    rows = [{"label_value": 1, "voxel_count": 10}, {"label_value": 2, "voxel_count": 10},
            {"label_value": 3, "voxel_count": 0}]
    add_confidence_columns(rows, {1: REVIEW_BELOW - 0.01, 2: REVIEW_BELOW + 0.01, 3: 0.1})
    assert [(r["review"], r["confidence"]) for r in rows] == [
        (True, REVIEW_BELOW - 0.01), (False, REVIEW_BELOW + 0.01), (None, None)]


def test_same_labels_as_segment_volume_and_lower_confidence_on_a_degraded_image():
    model = load_model("leg")
    clean, _ = make_phantom("leg", shape=(3, 432, 432), seed=9010)
    labels, confidence = segment_with_confidence(clean, model, device="cpu")
    assert np.array_equal(sitk.GetArrayViewFromImage(labels),
                          sitk.GetArrayViewFromImage(segment_volume(clean, model, device="cpu")))
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) - {0}
    confidence = confidence.per_label
    assert present <= set(confidence) and all(0.0 < v <= 1.0 for v in confidence.values())
    # Heavily fat-infiltrated muscle is harder to tell from fat: the network is less sure of it.
    fatty, _ = make_phantom("leg", shape=(3, 432, 432), seed=9010, contrast="water", fat_infiltration=0.6)
    degraded = segment_with_confidence(fatty, model, device="cpu")[1].per_label
    shared = present & set(degraded)
    assert np.mean([degraded[v] for v in shared]) < np.mean([confidence[v] for v in shared]) - 0.04
    assert min(degraded.values()) < REVIEW_BELOW < min(confidence.values())


def test_segment_stats_report_confidence_and_review(tmp_path: Path, capsys):
    image, _ = make_phantom("leg", shape=(3, 432, 432), seed=9011)
    path = tmp_path / "calf.nii.gz"
    sitk.WriteImage(image, str(path))
    stats = tmp_path / "stats.csv"
    assert main(["segment", str(path), "--model", "leg", "-o", str(tmp_path / "seg.seg.nrrd"), "--no-progress",
                 "--stats", str(stats)]) == 0
    rows = list(csv.DictReader(stats.open()))
    present = [row for row in rows if int(row["voxel_count"])]
    assert present and all(0.0 < float(row["confidence"]) <= 1.0 for row in present)
    assert all(row["review"] == str(float(row["confidence"]) < REVIEW_BELOW) for row in present)
    assert all(row["confidence"] == "" and row["review"] == "" for row in rows if not int(row["voxel_count"]))
    printed = capsys.readouterr().out
    flagged = [row["name"] for row in present if row["review"] == "True"]
    assert all(name in printed for name in flagged) and ("unsure of" in printed) == bool(flagged)
    assert "least sure on slices" not in printed  # 3 slices: nothing to choose between
