"""Test-time augmentation and two-contrast ensembles against the fat-fraction error (development data only).

The worst per-muscle fat-fraction errors come from thin muscles (sartorius, adductor longus, gracilis)
whose segmentation strays. Cheap inference-side remedies, tried on the phantom Dixon pairs of the
development seeds 200–205 (never the benchmark's 100–102) with the bundled model:

- **two contrasts**: the class probabilities of the water image and of the in-phase image
  (water + fat) averaged: a Dixon scan gives both for free;
- **shifts**: probabilities averaged over the slice and four copies shifted by 4 pixels (in-plane),
  each shifted back;
- **zoom and rotation**: over the slice and copies zoomed by 0.9 and 1.1 and rotated by ±10°, each
  warped back (bilinear);
- **gamma**: over the normalised slice raised to the powers 0.7, 1 and 1.4 (contrast jitter).

Reported: mean Dice against the exact labels, and mean / worst absolute fat-fraction error (points)
per erosion. A guide, not a benchmark: nothing is judged on it.

Usage: python bench/tta_dev.py [--region thigh|leg] [--out bench/results/tta_dev_REGION.json]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch
from choose_review_threshold import DEV_CASES  # bench/ is on the path: this script's folder

from dafne_logic.core.preprocessing import PreparedVolume, PreprocessingParams

Predict = Callable[[np.ndarray], np.ndarray]  # (n, H, W) normalised slices -> (n, C, H, W) probabilities

SHIFTS_PX = ((0, 0), (4, 0), (-4, 0), (0, 4), (0, -4))
WARPS = ((1.0, 0.0), (0.9, 0.0), (1.1, 0.0), (1.0, 10.0), (1.0, -10.0))  # (zoom, rotation in degrees)
GAMMAS = (1.0, 0.7, 1.4)


def shifted(predict: Predict, slices: np.ndarray) -> np.ndarray:
    """Mean probabilities over :data:`SHIFTS_PX` in-plane shifts, each rolled back onto the slice."""
    total = 0.0
    for dy, dx in SHIFTS_PX:
        p = predict(np.roll(slices, (dy, dx), axis=(1, 2)))
        total = total + np.roll(p, (-dy, -dx), axis=(2, 3))
    return total / len(SHIFTS_PX)


def _grid(theta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.nn.functional.affine_grid(theta.expand(shape[0], 2, 3), list(shape), align_corners=False)


def warped(predict: Predict, slices: np.ndarray) -> np.ndarray:
    """Mean probabilities over the :data:`WARPS` (zoom about the centre, rotation), each warped back.

    A sample at output point u is read at A·u: the slice is zoomed by 1/zoom; the probabilities
    are read back at A⁻¹·u. Borders take the nearest edge value (background in a leg crop).
    """
    x = torch.from_numpy(slices[:, None])
    total = 0.0
    for zoom, degrees in WARPS:
        a = math.radians(degrees)
        forward = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float32) / zoom
        theta = torch.cat([forward, torch.zeros(2, 1)], 1)[None]
        inverse = torch.cat([torch.linalg.inv(forward), torch.zeros(2, 1)], 1)[None]
        moved = torch.nn.functional.grid_sample(x, _grid(theta, tuple(x.shape)), align_corners=False, padding_mode="border")
        p = torch.from_numpy(predict(moved[:, 0].numpy()))
        total = total + torch.nn.functional.grid_sample(p, _grid(inverse, tuple(p.shape)), align_corners=False,
                                                        padding_mode="border").numpy()
    return total / len(WARPS)


def gamma_jittered(predict: Predict, slices: np.ndarray) -> np.ndarray:
    """Mean probabilities over the normalised slices raised to each of :data:`GAMMAS` (on [0, 1])."""
    return sum(predict(np.clip(slices, 0, 1) ** g if g != 1.0 else slices) for g in GAMMAS) / len(GAMMAS)


def in_phase_crops(in_phase: sitk.Image, water: PreparedVolume, params: PreprocessingParams) -> dict[str, np.ndarray]:
    """The in-phase image on exactly the water image's leg crops (same rows, columns, mirroring),
    normalised by its own body percentiles, so the two contrasts' probabilities can be averaged."""
    from dafne_logic.core import preprocessing as pre

    volume = sitk.GetArrayViewFromImage(pre.canonical(in_phase))
    spacing_yx = (in_phase.GetSpacing()[1], in_phase.GetSpacing()[0])
    low, high, fill = pre._intensity_statistics(volume, pre.body_mask(volume, spacing_yx), params.percentiles)
    crops = {}
    for leg in water.legs:
        crop = (pre._sample(volume, leg.rows, leg.columns, order=1, fill=fill, dtype=np.float32) - low) / (high - low)
        crops[leg.side] = pre._mirror(np.clip(crop, *pre.NORMALISED_RANGE), leg.mirrored)
    return crops


def main() -> None:
    from variant_scores import dev_arguments

    args = dev_arguments(__doc__.splitlines()[0], "tta_dev")

    from variant_scores import Dices, Errors, cpu_predictor, dev_pairs, report_variants, score_variant

    from dafne_logic.core.preprocessing import LabelAssembler, prepare_volume
    from dafne_logic.inference.model_package import load_model

    model = load_model(args.region)
    predict = cpu_predictor(model)
    errors: Errors = {}
    dice: Dices = {}
    for seed, pair in dev_pairs(args.region):
        water = prepare_volume(pair.water, model.manifest.preprocessing)
        in_phase = in_phase_crops(sitk.Add(pair.water, pair.fat), water, model.manifest.preprocessing)
        by_variant: dict[str, dict[str, np.ndarray]] = {}
        for leg in water.legs:
            base = predict(leg.image)
            other = predict(in_phase[leg.side])
            by_variant.setdefault("water", {})[leg.side] = base
            by_variant.setdefault("in-phase", {})[leg.side] = other
            by_variant.setdefault("water + in-phase", {})[leg.side] = (base + other) / 2
            by_variant.setdefault("water, shifts", {})[leg.side] = shifted(predict, leg.image)
            by_variant.setdefault("water, zoom/rotation", {})[leg.side] = warped(predict, leg.image)
            by_variant.setdefault("water, gamma", {})[leg.side] = gamma_jittered(predict, leg.image)
        for name, probabilities in by_variant.items():
            assembler = LabelAssembler(water, model.labels)
            for side, p in probabilities.items():
                assembler.add(side, 0, p)
            score_variant(name, assembler.image(), pair, model.labels, errors, dice)
        print(f"{args.region} seed {seed} done", flush=True)
    report_variants(errors, dice, f"{args.region}, development seeds {DEV_CASES[0][0]}–{DEV_CASES[-1][0]}; "
                    "fat-fraction error mean / worst (points) per erosion:",
                    args.out,
                    f"{args.region} (version {model.manifest.version})", 22)


if __name__ == "__main__":
    main()
