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

import numpy as np
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
    from variant_scores import dev_arguments

    args = dev_arguments(__doc__.splitlines()[0], "postprocessing_dev")
    import SimpleITK as sitk
    from scipy import ndimage
    from variant_scores import Dices, Errors, cpu_predictor, dev_pairs, report_variants, score_variant

    from dafne_logic.core.preprocessing import LabelAssembler, prepare_volume
    from dafne_logic.inference.model_package import load_model

    model = load_model(args.region)
    predict = cpu_predictor(model)
    n_labels = 2 * model.labels.n_muscles
    errors: Errors = {}
    dice: Dices = {}
    for seed, pair in dev_pairs(args.region):
        prepared = prepare_volume(pair.water, model.manifest.preprocessing)
        probabilities = {leg.side: predict(leg.image) for leg in prepared.legs}
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
            score_variant(name, labels, pair, model.labels, errors, dice)
        print(f"{args.region} seed {seed} done", flush=True)
    report_variants(errors, dice, f"{args.region}, development seeds {DEV_CASES[0][0]}–{DEV_CASES[-1][0]}, water image; "
                    "fat-fraction error mean / worst (points) per erosion:",
                    args.out,
                    f"{args.region} (version {model.manifest.version})", 26)


if __name__ == "__main__":
    main()
