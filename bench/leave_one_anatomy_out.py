"""Leave-one-anatomy-out Dice of the calf recipe on the real calf slices (needs ../shared/data).

For each real calf slice (``calf_slices/{t1,pd}_example``) the calf recipe is trained **from random
weights** on every calf anatomy source except that slice's own label map: the other real slice's
label map, MuscleMap ``test_dseg_a`` (coarse calf labels), the Visible Human maps (four full-length
calves, when present) and procedural phantoms. The real slice is then segmented through the whole
inference path (``segment_volume``) and scored against its manual labels. Neither the image nor the
label map of a scored slice ever reaches the model that scores it: these are figures on anatomy
never seen, the ones the model cards lead with.

Usage::

    python bench/leave_one_anatomy_out.py --steps 20000 --batch-size 32 --device cuda     # GPU, full
    python bench/leave_one_anatomy_out.py --steps 3000                                     # CPU, reduced
    python bench/leave_one_anatomy_out.py --steps 20000 --time-limit 7 --device cuda      # as many steps as fit
    python bench/leave_one_anatomy_out.py --steps 5 --results /tmp/loao --work-dir /tmp/loao-work  # smoke test

Writes ``RESULTS/leave_one_anatomy_out[_TAG].json`` (per held-out slice: Dice per label and mean,
the training command, the label maps trained on, steps, device, seconds) and ``.csv`` (slice,
label, dice). The trained models stay in ``--work-dir`` (a temporary folder unless given).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from dafne_logic.cli import main as dafne_slicer
from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.numbers import strict_json
from dafne_logic.inference.model_package import ModelPackage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_base_models import REAL_CALF_SLICES, real_calf_slice  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE_WEIGHTS = ("VHM_legs=0.6", "VHF_legs=0.6")  # the cadaver calves: 4 legs, externally rotated


def anatomy_sources(data: Path, held_out: str) -> list[Path]:
    """Every calf anatomy source but ``held_out``'s own label map."""
    sources = [data / "calf_slices" / f"{name}_labels.nii.gz" for name in REAL_CALF_SLICES if name != held_out]
    sources.append(data / "lowerbody_label_maps" / "test_dseg_a.nii.gz")
    visible_human = data / "visible_human_label_maps"
    if visible_human.is_dir():
        sources.append(visible_human)
    return sources


def train_command(args: argparse.Namespace, held_out: str, output: Path) -> list[str]:
    """The ``dafne-slicer train`` arguments of the calf recipe without ``held_out``'s anatomy."""
    sources = anatomy_sources(args.data, held_out)
    # Weights only for label maps that are there (dafne-slicer train refuses a NAME matching none).
    names = [p.name for source in sources for p in ([source] if not source.is_dir() else source.rglob("*"))]
    weights = [w for w in args.source_weights if any(w.split("=")[0] in name for name in names)]
    command = ["train", "--region", "leg", "--label-maps", *map(str, sources),
               "--phantoms", str(args.phantoms), "--phantom-share", str(args.phantom_share),
               "--holdout-subjects", f"phantom_{1000 + args.seed + args.phantoms - 1}",
               "--output", str(output), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--seed", str(args.seed), "--device", args.device,
               "--checkpoint-every", str(max(1, min(1000, args.steps))), "--val-every", str(max(1, min(1000, args.steps))),
               "--no-progress"]
    command += ["--time-limit", str(args.time_limit)] if args.time_limit else []
    return command + (["--source-weights", *weights] if weights else [])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, required=True, help="training steps per held-out slice")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--phantoms", type=int, default=9)
    parser.add_argument("--phantom-share", type=float, default=0.3)
    parser.add_argument("--source-weights", nargs="*", default=list(DEFAULT_SOURCE_WEIGHTS), metavar="NAME=WEIGHT")
    parser.add_argument("--slices", nargs="+", default=list(REAL_CALF_SLICES), choices=REAL_CALF_SLICES)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="folder for JSON and CSV")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--work-dir", type=Path, help="where the models are trained (default: a temporary folder)")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES",
                        help="per held-out slice: end each training within this wall time (at most --steps)")
    args = parser.parse_args(argv)
    if not (args.data / "calf_slices").is_dir():
        print(f"{args.data / 'calf_slices'} is absent (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loao-"))
    report: dict[str, object] = {
        "what": "calf recipe trained without the scored slice's label map (anatomy never seen), from random weights",
        "anatomy_of_scored_slice_seen_in_training": False,
        "image_of_scored_slice_used": False,
        "command": "python bench/leave_one_anatomy_out.py " + shlex.join(argv),
        "slices": {},
    }
    rows = []
    for name in args.slices:
        output = work / f"leg-without-{name}"
        command = train_command(args, name, output)
        began = time.monotonic()
        if dafne_slicer(command) != 0:
            print(f"training without {name} failed", file=sys.stderr)
            return 1
        seconds = time.monotonic() - began
        model = ModelPackage.load(output)
        dice = real_calf_slice(model, args.data, name, device="cuda" if args.device.startswith("cuda") else "cpu")
        training = model.manifest.provenance["training"]
        report["slices"][name] = {  # type: ignore[index]
            "dice": dice, "mean_dice": dice["mean_dice"], "steps": training.get("steps_done", args.steps),
            "device": training.get("device"),
            "training_seconds": round(seconds, 1), "label_maps": training.get("label_maps"),
            "train_command": "dafne-slicer " + shlex.join(command),
            "phantom_validation": (training.get("final_validation") or {}).get("mean_dice")}
        rows += [{"slice": name, "label": label, "dice": f"{value:.4f}"} for label, value in dice.items()]
        print(f"{name}: mean Dice {dice['mean_dice']:.3f} on anatomy never seen "
              f"({training.get('steps_done', args.steps)} steps, {seconds:.0f} s)")
    stem = "leave_one_anatomy_out" + (f"_{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / f"{stem}.json", json.dumps(strict_json(report), indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["slice", "label", "dice"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.results / f"{stem}.csv", table.getvalue())
    print(f"figures -> {args.results / stem}.json, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
