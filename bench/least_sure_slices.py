"""Are the slices the network was least sure on the worst-segmented ones? (the Slicer status's pointer)

Four bilateral phantom thighs never trained on (seeds 300–303; T1, Dixon water with infiltration
0.35 and 0.5, T2 with 0.2; 24 slices each) are segmented by the bundled thigh model with
``segment_with_confidence``. Per slice: the confidence (mean top-two margin over its muscle pixels)
and the mean Dice over the muscles the exact labels hold there. Reported: the Spearman correlation
of the two per case and overall, and per case the mean Dice of the three least-sure slices beside
that of the three worst slices and of all slices.

Usage: python bench/least_sure_slices.py [--out bench/results/least_sure_slices.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.stats import spearmanr

CASES = ((300, 0.0, "t1"), (301, 0.35, "water"), (302, 0.5, "water"), (303, 0.2, "t2"))
SLICES = 24


def slice_dice(auto: np.ndarray, exact: np.ndarray) -> list[float]:
    """Mean Dice over the labels of ``exact`` on each slice (z, y, x arrays)."""
    from dafne_logic.learning.evaluation import dice_counts, dice_from_counts

    n_labels = int(max(auto.max(), exact.max()))
    scores = []
    for a, b in zip(auto, exact, strict=True):
        per_value = dice_from_counts(*dice_counts(a, b, n_labels))
        scores.append(float(np.mean([per_value[v] for v in np.unique(b) if v > 0])))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "least_sure_slices.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.segment import segment_with_confidence
    from dafne_logic.phantoms.images import make_phantom

    model = load_model("thigh")
    report, all_confidence, all_dice = [], [], []
    for seed, infiltration, contrast in CASES:
        image, exact = make_phantom("thigh", shape=(SLICES, 432, 432), seed=seed, fat_infiltration=infiltration,
                                    contrast=contrast, noise=0.03)
        labels, confidence = segment_with_confidence(image, model, device="cpu")
        dice = np.array(slice_dice(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(exact)))
        sure = np.array([confidence.per_slice[k] for k in range(SLICES)])
        least = confidence.least_sure_slices(3)
        row = {"seed": seed, "contrast": contrast, "fat_infiltration": infiltration,
               "spearman": float(spearmanr(sure, dice)[0]), "least_sure_slices": least,
               "dice_least_sure_3": float(dice[least].mean()), "dice_worst_3": float(np.sort(dice)[:3].mean()),
               "dice_all": float(dice.mean())}
        report.append(row)
        all_confidence += sure.tolist()
        all_dice += dice.tolist()
        print(f"seed {seed} ({contrast}, infiltration {infiltration}): Spearman {row['spearman']:.2f}; Dice of the 3 least-sure "
              f"slices {row['dice_least_sure_3']:.3f}, of the 3 worst {row['dice_worst_3']:.3f}, of all {row['dice_all']:.3f}")
    overall = float(spearmanr(all_confidence, all_dice)[0])
    print(f"all {len(all_dice)} slices: Spearman correlation of slice confidence and slice Dice {overall:.2f}")
    Path(args.out).write_text(json.dumps({"cases": report, "spearman_all": overall}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
