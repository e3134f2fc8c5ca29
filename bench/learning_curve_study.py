"""Simulated learning-curve study (issue 4): does Dice rise per fine-tuned generation?

A stream of cases from a **shifted domain** (phantoms with heavy fat infiltration beyond what the
phantom-trained base models saw in training, optionally in a contrast they never saw) is
fine-tuned on in turn, as a user correcting one case after another would: generation k is
generation k-1 fine-tuned on stream case k (every slice of it "corrected": the phantom truth),
with the default :class:`~dafne_logic.learning.finetune.FinetuneConfig`. Every generation is scored on
held-out cases of the shifted domain and of the **original** domain (the contrasts and fat levels
of the base model's training), Dice per volume label on the network's leg crops. The mixed model
of :mod:`dafne_logic.learning.learning_curve` then gives the slope per generation.

Targets (issue 4): shifted-domain slope >= 0.009 Dice per generation with p < 0.001; original
domain loses <= 0.01 mean Dice between generation 0 and the last.

Writes into ``--out``: ``dice_shifted.csv`` and ``dice_original.csv`` (the ``evaluate`` format,
versions = generation numbers), ``fit_*.json``, ``curve_*.png`` and ``summary.json``.

Usage: nice -n 10 python bench/learning_curve_study.py --model leg --out study-out [--stream 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.preprocessing import prepare_volume
from dafne_logic.inference.model_package import ModelPackage, load_model
from dafne_logic.learning.evaluation import mean_dice, write_dice_csv
from dafne_logic.learning.finetune import finetune_on_corrections
from dafne_logic.learning.finetune_loop import agreement_dice, predict_classes
from dafne_logic.learning.finetune_slices import TrainingSlices, collect_training_slices
from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve
from dafne_logic.phantoms.images import CONTRASTS, INTENSITIES, Tissue, phantom_tissue_map, render_contrast, to_image

log = logging.getLogger("study")

# A contrast no base model saw: muscle brighter than fat (as on a fat-suppressed, long-TE image),
# marrow dark, thin fascia bright, vessels grey.
UNSEEN_CONTRAST = np.array([0.0, 0.8, 0.35, 1.6, 0.4, 0.05, 0.3, 1.0, 0.7], np.float32)


@dataclass(frozen=True)
class Domain:
    name: str
    contrast: str  # a name of phantoms.INTENSITIES, "random" (one per case) or "unseen"
    fat_infiltration: float
    noise: float
    bias: float


def make_case(region: str, domain: Domain, seed: int, n_slices: int):
    """(image, volume labels) of one phantom of ``domain``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57D]))
    if domain.contrast == "random":
        table = INTENSITIES[str(rng.choice(CONTRASTS))]
    elif domain.contrast == "unseen":
        table = UNSEEN_CONTRAST
    else:
        table = INTENSITIES[domain.contrast]
    anatomy = phantom_tissue_map(region, (n_slices, 432, 432), None, seed)
    array = render_contrast(anatomy.tissues, anatomy.muscles, table, rng, spacing=anatomy.spacing,
                            noise=domain.noise, bias=domain.bias, fat_infiltration=domain.fat_infiltration)
    assert len(table) == len(Tissue)
    return to_image(array, anatomy), to_image(anatomy.muscles, anatomy)


def prepared_case(model: ModelPackage, region: str, domain: Domain, seed: int, n_slices: int) -> TrainingSlices:
    """Every leg-slice of a held-out case, prepared once (scored by every generation)."""
    image, labels = make_case(region, domain, seed, n_slices)
    return collect_training_slices(prepare_volume(image, model.manifest.preprocessing, labels, model.labels),
                                   model.labels, min_muscles=1)


def score(model: ModelPackage, cases: dict[str, TrainingSlices], generation: int) -> list[dict]:
    net = model.network("cpu")
    rows = []
    for name, data in cases.items():
        per_label = agreement_dice(predict_classes(net, data.images), data, model.labels)
        rows.append({"dataset": name, "model_version": str(generation), "dice": mean_dice(per_label), **per_label})
    return rows


def fit_and_plot(rows: list[dict], out: Path, tag: str) -> dict:
    import pandas as pd

    data = prepare_learning_curve(pd.DataFrame(rows))
    fit = fit_learning_curve(data)
    plot_learning_curve(data, fit, out / f"curve_{tag}.png", title=f"{tag} domain: {fit.n_datasets} held-out cases")
    atomic_write_text(out / f"fit_{tag}.json", json.dumps(fit.to_json(), indent=2) + "\n")
    by_generation = data.groupby("generation")["dice"].mean()
    return {**fit.to_json(), "mean_dice_per_generation": [round(float(v), 4) for v in by_generation.values]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="leg", help="base model (registry name or folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stream", type=int, default=10, help="shifted cases fine-tuned on in turn")
    parser.add_argument("--held-out", type=int, default=4, help="held-out cases per domain")
    parser.add_argument("--slices", type=int, default=4, help="corrected slices per stream case")
    parser.add_argument("--held-out-slices", type=int, default=4, help="slices per held-out case")
    parser.add_argument("--shift-contrast", default="t1", help="contrast of the shifted domain (or 'unseen')")
    parser.add_argument("--shift-fat", type=float, default=0.85, help="fat infiltration of the shifted domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_model(args.model)
    region = base.manifest.region
    shifted = Domain("shifted", args.shift_contrast, args.shift_fat, noise=0.05, bias=0.3)
    original = Domain("original", "random", 0.0, noise=0.03, bias=0.2)
    # Seeds: stream 1000+, held-out shifted 2000+, held-out original 3000+ (no anatomy shared).
    held = {
        "shifted": {f"shifted_{s}": prepared_case(base, region, shifted, 2000 + s, args.held_out_slices)
                    for s in range(args.held_out)},
        "original": {f"original_{s}": prepared_case(base, region, original, 3000 + s, args.held_out_slices)
                     for s in range(args.held_out)},
    }
    rows: dict[str, list[dict]] = {"shifted": [], "original": []}
    model = base
    runs = []
    began = time.monotonic()
    for generation in range(args.stream + 1):
        if generation > 0:
            image, labels = make_case(region, shifted, 1000 + generation, args.slices)
            result = finetune_on_corrections(model, image, labels, seed=args.seed + generation)
            model = result.model
            r = result.report
            runs.append({k: r[k] for k in ("version", "n_leg_slices", "epochs", "stop_reason", "seconds",
                                           "mean_dice_before", "mean_dice_after", "delta_megabytes")})
            log.info("generation %d: fine-tuned on stream case %d (%s, %.0f s): Dice on it %.3f -> %.3f",
                     generation, generation, r["stop_reason"], r["seconds"], r["mean_dice_before"],
                     r["mean_dice_after"])
        for tag in rows:
            rows[tag] += score(model, held[tag], generation)
        means = {tag: np.mean([row["dice"] for row in rows[tag] if row["model_version"] == str(generation)])
                 for tag in rows}
        log.info("generation %d: held-out mean Dice shifted %.3f, original %.3f", generation,
                 means["shifted"], means["original"])

    summary = {"base_model": f"{base.manifest.name} {base.manifest.version}", "region": region,
               "shifted_domain": shifted.__dict__, "original_domain": original.__dict__,
               "stream": args.stream, "held_out_per_domain": args.held_out, "stream_slices": args.slices,
               "held_out_slices": args.held_out_slices,
               "seconds": time.monotonic() - began, "finetune_runs": runs}
    for tag in rows:
        write_dice_csv(rows[tag], out / f"dice_{tag}.csv")
        summary[tag] = fit_and_plot(rows[tag], out, tag)
    per_gen = summary["original"]["mean_dice_per_generation"]
    summary["original_change_first_to_last"] = round(per_gen[-1] - per_gen[0], 4)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    s, o = summary["shifted"], summary["original"]
    print(f"shifted domain: slope {s['slope']:+.4f} Dice/generation (SE {s['standard_error']:.4f}, "
          f"p = {s['p_value']:.2g}; target >= 0.009, p < 0.001), mean Dice {s['mean_dice_per_generation'][0]:.3f} "
          f"-> {s['mean_dice_per_generation'][-1]:.3f}")
    print(f"original domain: slope {o['slope']:+.4f} (p = {o['p_value']:.2g}), mean Dice {per_gen[0]:.3f} -> "
          f"{per_gen[-1]:.3f} (change {summary['original_change_first_to_last']:+.4f}; target >= -0.01)")
    print(f"{s['n_datasets']} + {o['n_datasets']} held-out cases, {args.stream} generations; files in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
