"""Points on the line from a model to its fine-tune (WiSE-FT ``alpha``), scored on development data only.

For each ``alpha`` the weights ``base + alpha * (tuned - base)`` (``interpolate_models.py``) segment the
development phantom Dixon pairs (seeds 200–205, never the benchmark's 100–102; water image) and are
scored as ``errors_by_muscle_dev.py`` scores one model: per-muscle Dice against the exact labels and
absolute fat-fraction error (2 mm erosion). A guide for choosing ``alpha`` in a later rule, on data
no verdict is judged on; it judges nothing itself.

Usage: python bench/wise_alpha_dev.py BASE TUNED [--alphas 0 0.25 0.5 0.75 1] [--region thigh]
       [--out bench/results/wise_alpha_dev_thigh.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from errors_by_muscle_dev import DEV_CASES, ERODE_MM, per_muscle_errors  # bench/ is on the path
from interpolate_models import interpolate

LARGE_ERROR = 5.0  # points: the worst-case target


def summarise(alpha: float, dice: dict[str, list[float]], error: dict[str, list[float]]) -> dict:
    """One alpha's row: mean Dice over every (case, muscle, side), fat-fraction error mean / worst /
    count over :data:`LARGE_ERROR`, and each muscle's mean Dice and worst error."""
    every_dice = np.concatenate([np.asarray(v) for v in dice.values()])
    every_error = np.concatenate([np.asarray(v) for v in error.values()])
    return {"alpha": alpha, "mean_dice": float(every_dice.mean()), "ff_mean_abs": float(every_error.mean()),
            "ff_max_abs": float(every_error.max()), "over_5": int((every_error > LARGE_ERROR).sum()),
            "n": int(every_error.size),
            "muscles": {m: {"mean_dice": float(np.mean(dice[m])), "ff_max_abs": float(np.max(error.get(m) or [np.nan]))}
                        for m in sorted(dice)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--region", default="thigh", choices=["thigh", "leg"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from dafne_logic.inference.model_package import load_model

    base, tuned = load_model(args.base), load_model(args.tuned)
    rows = []
    print(f"{args.base} -> {args.tuned}, {args.region} phantom Dixon pairs of seeds {DEV_CASES[0][0]}–{DEV_CASES[-1][0]} "
          f"(development), water image, {ERODE_MM:g} mm")
    for alpha in args.alphas:
        row = summarise(alpha, *per_muscle_errors(interpolate(base, tuned, alpha), args.region))
        rows.append(row)
        print(f"  alpha {alpha:4.2f}: Dice {row['mean_dice']:.3f}   fat-fraction error {row['ff_mean_abs']:.2f} mean, "
              f"{row['ff_max_abs']:5.1f} worst, {row['over_5']} of {row['n']} over {LARGE_ERROR:g} points", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"wise_alpha_dev_{args.region}.json"
    out.write_text(json.dumps({"base": args.base, "tuned": args.tuned, "cases": DEV_CASES, "erode_mm": ERODE_MM,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
