"""Shared by the development-seed studies of inference variants (``postprocessing_dev.py``,
``tta_dev.py``): each variant's label map scored against the phantom's exact labels (Dice) and its
per-muscle fat-fraction error per erosion, then summarised, printed and saved."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from bench_fat_fraction import EROSIONS_MM, errors_per_erosion
from choose_review_threshold import DEV_CASES

DEV_SHAPE = (16, 432, 432)  # slices, rows, columns of each development phantom Dixon pair
Errors = dict[str, dict[float, list[float]]]  # variant -> erosion (mm) -> absolute errors (points)
Dices = dict[str, list[float]]  # variant -> Dice per muscle


def dev_arguments(description: str, stem: str) -> argparse.Namespace:
    """``--region`` (thigh or leg) and ``--out`` (default ``bench/results/STEM_REGION.json``) of a study;
    torch on at most 2 threads, as every saved result was computed."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--region", default="thigh", choices=["thigh", "leg"])
    parser.add_argument("--out", type=Path, help=f"JSON output (default bench/results/{stem}_REGION.json)")
    args = parser.parse_args()
    args.out = args.out or Path(__file__).parent / "results" / f"{stem}_{args.region}.json"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return args


def dev_pairs(region: str) -> Iterator[tuple[int, Any]]:
    """(seed, phantom Dixon pair) of each development case (seeds 200–205, never the benchmark's)."""
    from dafne_logic.phantoms.images import make_dixon_phantom

    for seed, infiltration in DEV_CASES:
        yield seed, make_dixon_phantom(region, shape=DEV_SHAPE, fat_infiltration=infiltration, seed=seed)


def cpu_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The model's network on the CPU as a function: (n, H, W) normalised slices -> (n, C, H, W) probabilities."""
    import torch

    from dafne_logic.inference.segment import predict_slices

    device = torch.device("cpu")
    net = model.network(device)
    return lambda slices: np.concatenate([p for _, p in predict_slices(net, slices.astype(np.float32), device)])


def score_variant(name: str, labels: sitk.Image, pair: Any, table: Any, errors: Errors, dice: Dices) -> None:
    """Add the fat-fraction errors and muscle Dice of variant ``name``'s ``labels`` on a phantom Dixon ``pair``."""
    from dafne_logic.learning.evaluation import dice_counts, dice_from_counts

    for erode, by_label in errors_per_erosion(pair.water, pair.fat, labels, pair.true_fat_fraction, table).items():
        errors.setdefault(name, {}).setdefault(erode, []).extend(abs(e) for e in by_label.values())
    per_value = dice_from_counts(*dice_counts(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(pair.labels),
                                              2 * table.n_muscles))
    dice.setdefault(name, []).extend(float(per_value[v]) for v in pair.true_fat_fraction)


def report_variants(errors: Errors, dice: Dices, heading: str, out: Path, model_name: str, width: int) -> None:
    """Print mean Dice and mean / worst error per erosion of every variant under ``heading``; write ``out`` (JSON)."""
    summary = {name: {"mean_dice": float(np.mean(dice[name])),
                      **{f"{e:g}": {"mean_abs": float(np.mean(v)), "max_abs": float(np.max(v))} for e, v in by_erosion.items()}}
               for name, by_erosion in errors.items()}
    print(f"\n{heading}")
    for name, row in summary.items():
        cells = "  ".join(f"{e:g} mm {row[f'{e:g}']['mean_abs']:5.2f} / {row[f'{e:g}']['max_abs']:5.1f}" for e in EROSIONS_MM)
        print(f"  {name:{width}s} Dice {row['mean_dice']:.4f}   {cells}")
    out.write_text(json.dumps({"cases": DEV_CASES, "model": model_name, "variants": summary}, indent=1) + "\n")
    print(f"wrote {out}")
