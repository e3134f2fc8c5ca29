"""Other ways of measuring a muscle's fat fraction from the automatic segmentation (development data only).

On the phantom Dixon pairs of the development seeds 200–205 (thigh and calf; never the benchmark's
100–102), segmented by the bundled models on the water image, the absolute error of the per-muscle
fat fraction (percentage points) for: the mean over the eroded muscle (what ``stats`` reports as
``fat_fraction_mean`` and the benchmark judges), the median instead (``fat_fraction_median``), and
the mean over a "confident core": only the pixels where the network's top-two probability margin
is at least a threshold keep their label. Reported for erosions 0–2 mm, exact labels as reference.
Neither alternative is used: this records why.

Usage: python bench/ff_estimators_dev.py [--out bench/results/ff_estimators_dev.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from choose_review_threshold import DEV_CASES  # bench/ is on the path: this script's folder

MARGINS = (0.5, 0.7, 0.8, 0.9, 0.95)
EROSIONS_MM = (0.0, 1.0, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ff_estimators_dev.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from dafne_logic.core.preprocessing import LabelAssembler, prepare_volume
    from dafne_logic.core.quantitative import fat_fraction_from_dixon
    from dafne_logic.core.statistics import muscle_statistics
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.segment import predict_slices
    from dafne_logic.phantoms.images import make_dixon_phantom

    errors: dict[str, list[float]] = {}

    def add(name: str, rows: list[dict], truth: dict[int, float], column: str = "fat_fraction_mean") -> None:
        errors.setdefault(name, []).extend(abs(r[column] - truth[r["label_value"]]) for r in rows
                                           if r["label_value"] in truth and r[column] is not None)

    for region in ("thigh", "leg"):
        model = load_model(region)
        device = torch.device("cpu")
        net = model.network(device)
        for seed, infiltration in DEV_CASES:
            pair = make_dixon_phantom(region, shape=(16, 432, 432), fat_infiltration=infiltration, seed=seed)
            water, fat, exact, truth = pair.water, pair.fat, pair.labels, pair.true_fat_fraction
            maps = [fat_fraction_from_dixon(water, fat, water)]
            prepared = prepare_volume(water, model.manifest.preprocessing)
            assemblers = {margin: LabelAssembler(prepared, model.labels) for margin in (0.0, *MARGINS)}
            for leg in prepared.legs:
                for first, probabilities in predict_slices(net, leg.image, device):
                    top_two = np.sort(probabilities, axis=1)[:, -2:]
                    margin = top_two[:, 1] - top_two[:, 0]
                    for threshold, assembler in assemblers.items():
                        kept = probabilities.copy()
                        kept[:, 0][margin < threshold] = 2.0  # background wins where the network was unsure
                        assembler.add(leg.side, first, kept)
            for erode in EROSIONS_MM:
                add(f"exact labels, mean, {erode:g} mm", muscle_statistics(water, exact, model.labels, maps=maps, erode_mm=erode), truth)
                add(f"exact labels, median, {erode:g} mm",
                    muscle_statistics(water, exact, model.labels, maps=maps, erode_mm=erode), truth, "fat_fraction_median")
                for threshold, assembler in assemblers.items():
                    rows = muscle_statistics(water, assembler.image(), model.labels, maps=maps, erode_mm=erode)
                    if threshold == 0.0:
                        add(f"automatic, mean, {erode:g} mm", rows, truth)
                        add(f"automatic, median, {erode:g} mm", rows, truth, "fat_fraction_median")
                    else:
                        add(f"automatic, mean over margin >= {threshold:g}, {erode:g} mm", rows, truth)
            print(f"{region} seed {seed} done", flush=True)
    summary = {name: {"mean_abs": float(np.mean(v)), "max_abs": float(np.max(v)), "n": len(v)} for name, v in errors.items()}
    print("\nabsolute error of the per-muscle fat fraction, percentage points (development seeds, thigh and calf):")
    for name, row in summary.items():
        print(f"  {name:52s} mean {row['mean_abs']:5.2f}  worst {row['max_abs']:5.1f}  ({row['n']} muscles)")
    Path(args.out).write_text(json.dumps({"cases": DEV_CASES, "errors": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
