"""Choose the confidence below which a muscle is marked for review (``inference.confidence.REVIEW_BELOW``).

Development data only: phantom Dixon pairs of seeds 200–205 (thigh and calf, infiltration 0.2,
0.35, 0.5), never the seeds 100–102 of ``bench_fat_fraction.py``. Each pair is segmented by the
bundled model on the water image; per muscle, the absolute error of the fat fraction (2 mm erosion)
and the muscle's confidence. Rule (fixed before the first run): of the thresholds 0.50, 0.55 … 0.95,
the one that flags the most muscles with an error over 5 points while flagging at most 30 % of all
muscles (the lowest such threshold on a tie).

Usage: python bench/choose_review_threshold.py [--out bench/results/review_threshold_dev.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

DEV_CASES = ((200, 0.2), (201, 0.35), (202, 0.5), (203, 0.35), (204, 0.5), (205, 0.2))
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
MAX_FLAGGED_SHARE = 0.30
LARGE_ERROR = 5.0


def flag_summary(errors: np.ndarray, confidence: np.ndarray, threshold: float) -> dict:
    """What flagging the muscles below ``threshold`` catches: per-muscle |errors| (points) and confidences."""
    flagged, large = confidence < threshold, errors > LARGE_ERROR

    def mean_or_none(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    return {"threshold": threshold, "muscles": int(errors.size), "flagged": int(flagged.sum()),
            "flagged_share": float(flagged.mean()), "large": int(large.sum()), "large_flagged": int((large & flagged).sum()),
            "flagged_mean_abs": mean_or_none(errors[flagged]), "unflagged_mean_abs": mean_or_none(errors[~flagged]),
            "unflagged_max_abs": float(errors[~flagged].max()) if (~flagged).any() else None}


def choose(errors: np.ndarray, confidence: np.ndarray) -> tuple[float | None, list[dict]]:
    """(chosen threshold or None, one summary per threshold) for per-muscle |errors| and confidences."""
    table, best, caught = [], None, -1
    for threshold in THRESHOLDS:
        row = flag_summary(errors, confidence, threshold)
        table.append(row)
        if row["flagged_share"] <= MAX_FLAGGED_SHARE and row["large_flagged"] > caught:
            best, caught = threshold, row["large_flagged"]
    return best, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "review_threshold_dev.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from dafne_logic.core.quantitative import fat_fraction_from_dixon
    from dafne_logic.core.statistics import muscle_statistics
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.segment import segment_with_confidence
    from dafne_logic.phantoms.images import make_dixon_phantom

    muscles = []
    for region in ("thigh", "leg"):
        model = load_model(region)
        for seed, infiltration in DEV_CASES:
            pair = make_dixon_phantom(region, shape=(16, 432, 432), fat_infiltration=infiltration, seed=seed)
            water, fat, truth = pair.water, pair.fat, pair.true_fat_fraction
            labels, confidence = segment_with_confidence(water, model, device="cpu")
            rows = muscle_statistics(water, labels, model.labels, maps=[fat_fraction_from_dixon(water, fat, water)], erode_mm=2)
            muscles += [{"region": region, "seed": seed, "name": row["name"], "confidence": confidence.per_label.get(row["label_value"], 0.0),
                         "abs_error": abs(row["fat_fraction_mean"] - truth[row["label_value"]])}
                        for row in rows if row["label_value"] in truth and row["fat_fraction_mean"] is not None]
    errors = np.array([m["abs_error"] for m in muscles])
    confidence = np.array([m["confidence"] for m in muscles])
    best, table = choose(errors, confidence)
    print(f"{len(muscles)} muscles of {2 * len(DEV_CASES)} development phantom Dixon pairs; "
          f"{int((errors > LARGE_ERROR).sum())} with a fat-fraction error over {LARGE_ERROR:g} points (water image, 2 mm)")
    for row in table:
        print(f"  confidence < {row['threshold']:.2f}: flags {row['flagged_share']:4.0%} of muscles, "
              f"{row['large_flagged']:2d} of the large errors; unflagged mean {row['unflagged_mean_abs'] or float('nan'):.2f}, "
              f"worst {row['unflagged_max_abs'] or float('nan'):.2f}")
    print(f"chosen by the rule (most large errors flagged, at most {MAX_FLAGGED_SHARE:.0%} of muscles flagged): {best}")
    Path(args.out).write_text(json.dumps({"chosen": best, "thresholds": table, "muscles": muscles}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
