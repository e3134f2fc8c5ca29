"""Inference-time post-processing against the fat-fraction error (development data only).

The thigh and calf models are 2D: each slice is segmented on its own. Two usual remedies were tried
on the phantom Dixon pairs of the development seeds 200–205 (never the benchmark's 100–102),
segmented by the bundled model on the water image:

- **through-plane smoothing**: each leg's class probabilities averaged over neighbouring slices
  (weights 1-2-1 or 1-4-1) before the argmax, so a muscle cannot jump between slices;
- **largest connected component**: per muscle, only its largest 3D (26-connected) piece is kept; the
  rest becomes background (``lcc``) or takes the nearest kept label (``lcc-fill``).

Reported: mean Dice against the exact labels, and mean / worst absolute fat-fraction error (points)
per erosion. Neither is used: this records why. A guide, not a benchmark: nothing is judged on it.

Usage: python bench/postprocessing_dev.py [--region thigh|leg] [--out bench/results/postprocessing_dev_REGION.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from choose_review_threshold import DEV_CASES  # bench/ is on the path: this script's folder

SMOOTHING = {"none": None, "slices 1-2-1": (0.25, 0.5, 0.25), "slices 1-4-1": (1 / 6, 4 / 6, 1 / 6)}


def largest_components(labels: np.ndarray, n_labels: int, fill: bool) -> np.ndarray:
    """(z, y, x) labels with each label 1..n_labels cut to its largest 26-connected component; the voxels
    cut off become 0, or (``fill``) the label of the nearest voxel kept."""
    from scipy import ndimage

    kept = labels.copy()
    structure = ndimage.generate_binary_structure(3, 3)
    for value in range(1, n_labels + 1):
        mask = labels == value
        pieces, n = ndimage.label(mask, structure)
        if n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            kept[mask & (pieces != sizes.argmax())] = 0
    removed = (labels > 0) & (kept == 0)
    if fill and removed.any():
        nearest = ndimage.distance_transform_edt(kept == 0, return_distances=False, return_indices=True)
        kept = np.where(removed, kept[tuple(nearest)], kept)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", default="thigh", choices=["thigh", "leg"])
    parser.add_argument("--out", help="JSON output (default bench/results/postprocessing_dev_REGION.json)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    import SimpleITK as sitk
    from bench_fat_fraction import EROSIONS_MM, errors_per_erosion
    from scipy import ndimage

    from dafne_logic.core.preprocessing import LabelAssembler, prepare_volume
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.segment import predict_slices
    from dafne_logic.learning.evaluation import dice_counts, dice_from_counts
    from dafne_logic.phantoms.images import make_dixon_phantom

    model = load_model(args.region)
    device = torch.device("cpu")
    net = model.network(device)
    n_labels = 2 * model.labels.n_muscles
    errors: dict[str, dict[float, list[float]]] = {}
    dice: dict[str, list[float]] = {}
    for seed, infiltration in DEV_CASES:
        pair = make_dixon_phantom(args.region, shape=(16, 432, 432), fat_infiltration=infiltration, seed=seed)
        prepared = prepare_volume(pair.water, model.manifest.preprocessing)
        probabilities = {leg.side: np.concatenate([p for _, p in predict_slices(net, leg.image, device)])
                         for leg in prepared.legs}
        exact = sitk.GetArrayViewFromImage(pair.labels)
        muscles = list(pair.true_fat_fraction)
        variants = {}
        for name, weights in SMOOTHING.items():
            assembler = LabelAssembler(prepared, model.labels)
            for side, p in probabilities.items():
                assembler.add(side, 0, p if weights is None else
                              ndimage.convolve1d(p, np.asarray(weights, np.float32), axis=0, mode="nearest"))
            variants[name] = assembler.image()
            for suffix, fill in ((" + lcc", False), (" + lcc-fill", True)):
                cut = sitk.GetImageFromArray(largest_components(sitk.GetArrayFromImage(variants[name]), n_labels, fill))
                cut.CopyInformation(pair.water)
                variants[name + suffix] = cut
        for name, labels in variants.items():
            for erode, by_label in errors_per_erosion(pair.water, pair.fat, labels, pair.true_fat_fraction,
                                                      model.labels).items():
                errors.setdefault(name, {}).setdefault(erode, []).extend(abs(e) for e in by_label.values())
            per_value = dice_from_counts(*dice_counts(sitk.GetArrayViewFromImage(labels), exact, n_labels))
            dice.setdefault(name, []).extend(float(per_value[v]) for v in muscles)
        print(f"{args.region} seed {seed} done", flush=True)
    summary = {name: {"mean_dice": float(np.mean(dice[name])),
                      **{f"{e:g}": {"mean_abs": float(np.mean(v)), "max_abs": float(np.max(v))} for e, v in by_erosion.items()}}
               for name, by_erosion in errors.items()}
    print(f"\n{args.region}, development seeds {DEV_CASES[0][0]}–{DEV_CASES[-1][0]}, water image; "
          "fat-fraction error mean / worst (points) per erosion:")
    for name, row in summary.items():
        cells = "  ".join(f"{e:g} mm {row[f'{e:g}']['mean_abs']:5.2f} / {row[f'{e:g}']['max_abs']:5.1f}" for e in EROSIONS_MM)
        print(f"  {name:26s} Dice {row['mean_dice']:.4f}   {cells}")
    out = Path(args.out or Path(__file__).parent / "results" / f"postprocessing_dev_{args.region}.json")
    out.write_text(json.dumps({"cases": DEV_CASES, "model": f"{args.region} (version {model.manifest.version})",
                               "variants": summary}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
