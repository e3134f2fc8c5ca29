"""Where the automatic segmentation's fat-fraction errors sit, muscle by muscle (development data only).

Phantom Dixon pairs of the development seeds 200–205 (thigh or calf; infiltration 0.2, 0.35, 0.5;
never the benchmark's seeds 100–102 of ``bench_fat_fraction.py``), segmented by a model on the water
image. Per muscle (both sides pooled): mean and lowest Dice against the exact labels, and mean and
worst absolute fat-fraction error (2 mm erosion, percentage points). A guide to what to improve next,
not a benchmark: nothing is judged on it.

Usage: python bench/errors_by_muscle_dev.py [--region thigh|leg] [--model thigh]
       [--out bench/results/errors_by_muscle_dev_thigh.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from choose_review_threshold import DEV_CASES  # bench/ is on the path: this script's folder

ERODE_MM = 2.0


def per_muscle_errors(model, region: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per muscle (sides pooled), the Dice of each development case and the absolute fat-fraction errors
    (points, :data:`ERODE_MM` erosion) of ``model`` (a ``ModelPackage``) on ``region``'s pairs."""
    import SimpleITK as sitk

    from dafne_logic.core.quantitative import fat_fraction_from_dixon
    from dafne_logic.core.statistics import muscle_statistics
    from dafne_logic.inference.segment import segment_volume
    from dafne_logic.learning.evaluation import dice_counts, dice_from_counts
    from dafne_logic.phantoms.images import make_dixon_phantom

    muscle_of = {label.value: label.name.split(" ", 1)[1] for label in model.labels.volume_labels()}  # side dropped
    dice: dict[str, list[float]] = {}
    error: dict[str, list[float]] = {}
    for seed, infiltration in DEV_CASES:
        pair = make_dixon_phantom(region, shape=(16, 432, 432), fat_infiltration=infiltration, seed=seed)
        water, fat, exact, truth = pair.water, pair.fat, pair.labels, pair.true_fat_fraction
        labels = segment_volume(water, model, device="cpu")
        per_value = dice_from_counts(*dice_counts(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(exact),
                                                  2 * model.labels.n_muscles))
        for v in truth:
            dice.setdefault(muscle_of[v], []).append(float(per_value[v]))
        maps = [fat_fraction_from_dixon(water, fat, water)]
        for row in muscle_statistics(water, labels, model.labels, maps=maps, erode_mm=ERODE_MM):
            if row["label_value"] in truth and row["fat_fraction_mean"] is not None:
                error.setdefault(muscle_of[row["label_value"]], []).append(abs(row["fat_fraction_mean"] - truth[row["label_value"]]))
    return dice, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", default="thigh", choices=["thigh", "leg"])
    parser.add_argument("--model", help="a bundled name or a package folder (default: the region's bundled model)")
    parser.add_argument("--out", help="JSON output (default bench/results/errors_by_muscle_dev_REGION.json)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from dafne_logic.inference.model_package import load_model

    model = load_model(args.model or args.region)
    dice, error = per_muscle_errors(model, args.region)
    print(f"{args.model or args.region} ({model.manifest.name} version {model.manifest.version}), {args.region} phantom Dixon pairs of seeds "
          f"{DEV_CASES[0][0]}–{DEV_CASES[-1][0]} (development), water image, {ERODE_MM:g} mm; worst Dice first:")
    table = {}
    for muscle in sorted(dice, key=lambda m: np.mean(dice[m])):
        errors = error.get(muscle) or [float("nan")]  # a muscle missed everywhere has no fat fraction
        table[muscle] = {"mean_dice": float(np.mean(dice[muscle])), "min_dice": float(np.min(dice[muscle])),
                         "ff_mean_abs": float(np.mean(errors)), "ff_max_abs": float(np.max(errors)),
                         "n": len(dice[muscle]), "n_ff": len(error.get(muscle, []))}
        row = table[muscle]
        print(f"  {muscle:28s} Dice {row['mean_dice']:.3f} (lowest {row['min_dice']:.3f})   fat-fraction error "
              f"{row['ff_mean_abs']:5.2f} mean, {row['ff_max_abs']:5.1f} worst")
    every = np.concatenate([np.asarray(v) for v in error.values()])
    print(f"  all {every.size} muscles: fat-fraction error {every.mean():.2f} mean, {every.max():.1f} worst")
    out = Path(args.out or Path(__file__).parent / "results" / f"errors_by_muscle_dev_{args.region}.json")
    out.write_text(json.dumps({"model": args.model or args.region, "version": model.manifest.version, "cases": DEV_CASES,
                               "erode_mm": ERODE_MM, "muscles": table,
                               "all": {"ff_mean_abs": float(every.mean()), "ff_max_abs": float(every.max()), "n": int(every.size)}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
