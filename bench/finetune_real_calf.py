"""Fine-tuning on real MR (issue 4): the bundled calf model learns from one corrected leg.

Data: ``../shared/data/calf_slices`` (real axial calf slices with manual labels, Apache-2.0, from
dafne-evaluation; two subjects, one T1 and one PD slice). The calf model is fine-tuned on ONE leg
of one slice (``--train-on``, T1 by default; its manual labels as the "correction", the other
leg's labels removed). Dice is measured, before and after, on the OTHER leg of the same slice
(never trained on) and on both legs of the other slice (another subject and contrast, never
trained on), through the whole ``segment_volume`` path. ``--set KEY=VALUE`` changes a
:class:`FinetuneConfig` field, to compare a candidate setting with the default.
Whether the anatomy of these slices was seen in base-model training depends on the bundled
model's recipe (see its manifest's provenance, printed below).

Usage: nice -n 10 python bench/finetune_real_calf.py [--data ../shared/data/calf_slices] [--side right]
       [--train-on t1|pd] [--seeds 0 1 2] [--set KEY=VALUE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dafne_logic.core.io import read_image, read_segmentation
from dafne_logic.core.labels import LabelTable
from dafne_logic.inference.model_package import ModelPackage, load_model
from dafne_logic.inference.segment import segment_volume
from dafne_logic.learning.evaluation import dice_per_label, mean_dice
from dafne_logic.learning.finetune import FinetuneConfig, finetune_on_corrections

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "calf_slices"


def one_side(labels: sitk.Image, table: LabelTable, side: str) -> sitk.Image:
    """Copy of volume labels keeping only ``side``'s muscles."""
    array = sitk.GetArrayFromImage(labels)
    keep = np.array([0] + [1 if (v <= table.n_muscles) == (side == "right") else 0
                           for v in range(1, 2 * table.n_muscles + 1)], bool)
    array[~keep[array]] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def scores(model: ModelPackage, cases: dict[str, tuple[sitk.Image, sitk.Image]], trained: str,
           other: str) -> dict[str, dict]:
    """Per-label Dice on the trained slice's other leg and on the other slice (both legs)."""
    out = {}
    for name, (image, labels) in cases.items():
        per_label = dice_per_label(segment_volume(image, model, device="cpu"), labels, model.labels)
        if name == trained:
            per_label = {k: v for k, v in per_label.items() if k.startswith(other)}
            name = f"{trained}_{other}_leg"
        out[name] = {"mean": mean_dice(per_label), "per_label": per_label}
    return out


def config_from(settings: list[str]) -> FinetuneConfig:
    """:class:`FinetuneConfig` with ``KEY=VALUE`` overrides (values typed as the field's default)."""
    defaults = FinetuneConfig()
    changes = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--set {setting}: FinetuneConfig has no field {key!r}")
        kind = type(getattr(defaults, key))
        changes[key] = kind(value) if kind is not bool else value.lower() in {"1", "true", "yes"}
    return replace(defaults, **changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", default="leg")
    parser.add_argument("--side", default="right", choices=("right", "left"), help="leg trained on")
    parser.add_argument("--train-on", default="t1", choices=("t1", "pd"), help="slice fine-tuned on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FinetuneConfig override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "finetune_real_calf.json"),
                        help="figures as JSON (default: bench/results/finetune_real_calf.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    model = load_model(args.model)
    table = model.labels
    cases = {}
    for name in ("t1", "pd"):
        labels, unknown = read_segmentation(data / f"{name}_example_labels.nii.gz", table)
        if unknown:
            raise SystemExit(f"{name}: labels not matched to the {table.region} table: {unknown}")
        cases[name] = (read_image(data / f"{name}_example.nii.gz"), labels)
    other = "left" if args.side == "right" else "right"
    config = config_from(args.set)
    trained = args.train_on
    print(f"model {model.manifest.name} {model.manifest.version}; trained on: "
          f"{model.manifest.provenance.get('trained_on', 'unknown')}")
    before = scores(model, cases, trained, other)
    results = {"model": model.manifest.version, "trained_slice": trained, "trained_side": args.side,
               "settings": args.set, "before": before, "after": {}}
    correction = one_side(cases[trained][1], table, args.side)
    for seed in args.seeds:
        result = finetune_on_corrections(model, cases[trained][0], correction, seed=seed, config=config)
        after = scores(result.model, cases, trained, other)
        r = result.report
        results["after"][seed] = {**after, "finetune": {k: r[k] for k in (
            "version", "n_leg_slices", "epochs", "stop_reason", "seconds", "mean_dice_before", "mean_dice_after",
            "delta_megabytes")}}
        print(f"seed {seed}: fine-tuned on the {args.side} leg of the {trained.upper()} slice ({r['n_leg_slices']} leg-slice, "
              f"{r['epochs']} epochs, {r['stop_reason']}, {r['seconds']:.1f} s; Dice on it "
              f"{r['mean_dice_before']:.3f} -> {r['mean_dice_after']:.3f})")
        for key in before:
            print(f"  {key:<14} mean Dice {before[key]['mean']:.3f} -> {after[key]['mean']:.3f}")
    for key in before:
        gains = [results["after"][seed][key]["mean"] - before[key]["mean"] for seed in args.seeds]
        results.setdefault("mean_gain", {})[key] = float(np.mean(gains))
        print(f"mean gain over seeds, {key}: {np.mean(gains):+.3f}")
    key_width = max(len(k) for k in before[next(iter(before))]["per_label"])
    print(f"\nper label (seed {args.seeds[0]}):")
    for key in before:
        for label, value in before[key]["per_label"].items():
            new = results["after"][args.seeds[0]][key]["per_label"][label]
            print(f"  {key:<14} {label:<{key_width}} {value:.3f} -> {new:.3f}")
    from dafne_logic.core.atomic import atomic_write_text

    atomic_write_text(args.json, json.dumps(results, indent=2, default=float) + "\n")
    print(f"figures saved in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
