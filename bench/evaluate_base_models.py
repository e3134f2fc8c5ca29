"""Dice of base models on the three measurements the model cards report (needs ../shared/data).

1. **Held-out thigh subjects**: label maps of subjects listed in the thigh models' manifests as held
   out (never trained on; every model is scored on the same ones); per-leg images synthesised from them with fresh seeds, one batch per
   contrast regime; Dice per label pooled over the images of each regime, and the mean over labels.
   The adductor longus is not labelled in those maps, so it has no Dice there (NaN, left out of the mean).
   Means are given over the MR-like regimes (every regime of ``synthesis.REGIMES`` but "random":
   T1, T2, PD, Dixon water and fat, STIR, dim fat-suppressed, gradient-echo in-phase and
   opposed-phase, fat fraction) and over all of them (with "random", every tissue drawn at an
   independent random intensity).
2. **Real calf slices** (leg models): ``calf_slices/{t1,pd}_example`` through the whole path
   (``segment_volume``: leg finding, crops, model, restore), Dice per volume label (12) against the
   manual labels. Their images are never used in training or model selection.
3. **Phantoms**: bilateral phantom volumes (fresh seeds, several contrasts) through ``segment_volume``.

Usage::

    python bench/evaluate_base_models.py --thigh MODEL_DIR... --leg MODEL_DIR... [--data ../shared/data]
        [--per-regime 48] [--synthesis KEY=VALUE ...] [--json OUT.json (default bench/results/evaluate_base_models.json)]

``--synthesis KEY=VALUE`` (JSON values, e.g. ``p_infiltration=0.3 infiltration_affected=[0.5,0.5]``)
changes a ``SynthesisConfig`` range of the held-out images: how a comparison fares on an earlier
version of the synthesis. The overrides are saved with the figures.

Several models per region are scored in the same run (e.g. the phantom-trained bundled model and a
new one), so their figures compare like with like.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.io import read_image, read_segmentation
from dafne_logic.core.labels import LEG, THIGH
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.inference.segment import segment_volume
from dafne_logic.learning.evaluation import dice_per_label, mean_dice
from dafne_logic.phantoms.images import make_phantom
from dafne_logic.training.harmonisation import GroupRegistry, find_label_maps, load_label_map, subject_id
from dafne_logic.training.samplers import AnatomyBank, SynthesisSampler
from dafne_logic.training.synthesis import REGIMES, SynthesisConfig, synthesis_overrides
from dafne_logic.training.synthetic_validation import dice_by_class

RESULTS = Path(__file__).resolve().parent / "results"

EVAL_SEED = 20261127  # never used in training (training seeds are 0.. and phantom seeds 1000..)
PHANTOM_SEEDS = (777001, 777002)
PHANTOM_CONTRASTS = ("t1", "t2", "water", "fat", "pd", "stir")


def _mean_defined(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def held_out_thigh(model: ModelPackage, data: Path, per_regime: int, holdout: set[str],
                   overrides: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Per-regime Dice on images synthesised from held-out thigh subjects.

    Muscles the label maps never label (adductor longus in the 11-label scheme) have no Dice (NaN):
    the maps leave them inside background, so a prediction there can be neither right nor wrong."""
    training = model.manifest.provenance.get("training", {})
    spacing = model.manifest.preprocessing.spacing_mm[0]
    size = training.get("synthesis", {}).get("size", [176, 176])
    files = [p for p in find_label_maps([data / "thigh_label_maps"]) if subject_id(p) in holdout]
    registry = GroupRegistry(THIGH.n_classes)
    bank = AnatomyBank.from_sources([load_label_map(p, THIGH, registry, spacing, (224, 224)) for p in files])
    unlabelled = {c for group in registry.groups if 0 in group for c in group} - {0}
    network = model.network("cpu")
    names = [m.name for m in THIGH.muscles]
    results = {}
    for k, regime in enumerate(REGIMES):
        config = SynthesisConfig(size=(size[0], size[1]), regimes=(regime,), spacing_mm=spacing, **(overrides or {}))
        sampler = SynthesisSampler(bank, config)
        generator = torch.Generator().manual_seed(EVAL_SEED + k)
        predictions, targets = [], []
        with torch.no_grad():
            for _ in range(max(1, per_regime // 8)):
                images, target = sampler(generator, 8)
                predictions.append(network(images).argmax(1))
                targets.append(target)
        scores = dice_by_class(torch.cat(predictions), torch.cat(targets), THIGH.n_classes)
        row = {n: math.nan if c in unlabelled else float(s) for c, (n, s) in enumerate(zip(names, scores, strict=True), start=1)}
        row["mean_dice"] = _mean_defined(list(row.values()))
        results[regime] = row
    # The MR-like regimes, then all of them: "random" gives every tissue an independent random
    # intensity (a training device, no scanner makes it), so it is reported but kept apart.
    contrasts = [r for r in REGIMES if r != "random"]
    results["contrast regimes"] = {n: _mean_defined([results[r][n] for r in contrasts]) for n in names + ["mean_dice"]}
    results["all regimes"] = {n: _mean_defined([results[r][n] for r in REGIMES]) for n in names + ["mean_dice"]}
    results["subjects"] = sorted(holdout)  # type: ignore[assignment]
    return results


REAL_CALF_SLICES = ("t1_example", "pd_example")


def real_calf_slice(model: ModelPackage, data: Path, name: str, device: str = "cpu") -> dict[str, float]:
    """Dice per volume label (and their mean) of ``model`` on the real calf slice ``name``, through
    the whole inference path."""
    image = read_image(data / "calf_slices" / f"{name}.nii.gz")
    reference, unknown = read_segmentation(data / "calf_slices" / f"{name}_labels.nii.gz", LEG)
    assert not unknown, unknown
    row = dice_per_label(segment_volume(image, model, device=device), reference, LEG)
    row["mean_dice"] = mean_dice(row)
    return row


def real_calf(model: ModelPackage, data: Path) -> dict[str, dict[str, float]]:
    return {name: real_calf_slice(model, data, name) for name in REAL_CALF_SLICES}


def phantoms(model: ModelPackage, region: str) -> dict[str, float]:
    rows = {}
    table = THIGH if region == "thigh" else LEG
    for contrast in PHANTOM_CONTRASTS:
        scores = []
        for seed in PHANTOM_SEEDS:
            image, labels = make_phantom(region=region, shape=(6, 256, 256), contrast=contrast, seed=seed)
            scores.append(mean_dice(dice_per_label(segment_volume(image, model, device="cpu"), labels, table)))
        rows[contrast] = float(np.mean(scores))
    rows["mean_dice"] = float(np.mean(list(rows.values())))
    return rows


def _print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    columns = [c for c in rows if isinstance(rows[c], dict)]
    labels = list(next(iter(rows[c] for c in columns)).keys())
    print(f"{'label':<34}" + "".join(f"{c[:12]:>13}" for c in columns))
    for label in labels:
        print(f"{label:<34}" + "".join(f"{rows[c].get(label, math.nan):>13.3f}" for c in columns))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--thigh", nargs="*", default=[], type=Path, help="thigh model folders")
    parser.add_argument("--leg", nargs="*", default=[], type=Path, help="leg (calf) model folders")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--per-regime", type=int, default=48, help="synthetic held-out images per contrast regime")
    parser.add_argument("--json", type=Path,
                        help="write all figures here (default: bench/results/evaluate_base_models.json, which holds "
                             "the shipped models' figures: other comparisons must name their own file)")
    parser.add_argument("--synthesis", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="SynthesisConfig ranges of the held-out images (JSON values); default: today's synthesis")
    args = parser.parse_args(argv)
    if args.json is None:
        shipped_only = ([str(p) for p in args.thigh] in ([], ["Logic/bundled_models/thigh"])
                        and [str(p) for p in args.leg] in ([], ["Logic/bundled_models/leg"]) and not args.synthesis)
        if not shipped_only:  # a candidate's figures would replace those the model cards quote
            raise SystemExit("give --json FILE: the default file holds the shipped models' figures only")
        args.json = RESULTS / "evaluate_base_models.json"
    try:
        overrides = synthesis_overrides(args.synthesis)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    torch.set_num_threads(min(2, torch.get_num_threads()))
    report: dict[str, dict] = {}
    thigh_models = [ModelPackage.load(p) for p in args.thigh]
    # Every thigh model is scored on the same held-out subjects: those any of them lists.
    holdout = {s for m in thigh_models for s in m.manifest.provenance.get("training", {}).get("holdout_subjects", [])}
    for path, model in zip(args.thigh, thigh_models, strict=True):
        began = time.process_time()
        entry = {"trained_on": model.manifest.provenance.get("trained_on")}
        if holdout:
            entry["held_out_thigh_synthetic"] = held_out_thigh(model, args.data, args.per_regime, holdout, overrides)
            if overrides:
                entry["synthesis_overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
            _print_table(f"{path}: held-out thigh subjects, synthetic images (Dice per label)",
                         {k: v for k, v in entry["held_out_thigh_synthetic"].items() if isinstance(v, dict)})
        entry["phantoms"] = phantoms(model, "thigh")
        print(f"{path}: phantom mean Dice by contrast {json.dumps({k: round(v, 3) for k, v in entry['phantoms'].items()})}")
        entry["cpu_seconds"] = time.process_time() - began
        report[str(path)] = entry
    for path in args.leg:
        model = ModelPackage.load(path)
        entry = {"trained_on": model.manifest.provenance.get("trained_on"), "real_calf": real_calf(model, args.data),
                 "phantoms": phantoms(model, "leg")}
        _print_table(f"{path}: real calf slices, zero-shot (Dice per label)", entry["real_calf"])
        print(f"{path}: phantom mean Dice by contrast {json.dumps({k: round(v, 3) for k, v in entry['phantoms'].items()})}")
        report[str(path)] = entry
    atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    print(f"figures saved in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
