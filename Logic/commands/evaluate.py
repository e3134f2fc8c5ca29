"""``dafne-slicer evaluate``: Dice of one or more model versions against reference segmentations."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from dafne_logic.commands.output_paths import check_outputs
from dafne_logic.core.errors import InputError

log = logging.getLogger(__name__)

SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, metavar="M",
                        help="models (thigh, leg, user model names or folders): each version is scored")
    parser.add_argument("--image", nargs="+", required=True, metavar="I", help="MR volumes")
    parser.add_argument("--reference", nargs="+", required=True, metavar="R",
                        help="reference segmentations, one per image, in the same order (matched by name)")
    parser.add_argument("--dataset", nargs="+", metavar="NAME",
                        help="dataset names for the CSV (default: the image file names)")
    parser.add_argument("--csv", required=True, metavar="OUT", help="output CSV: dataset,model_version,dice,<labels>")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def dataset_name(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def run(args: argparse.Namespace) -> int:
    from dafne_logic.core.io import label_table_path, labels_named_by, read_image, read_segmentation
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.learning.evaluation import EvaluationCase, evaluate_models, reference_on_image, write_dice_csv

    if len(args.image) != len(args.reference):
        raise InputError(f"{len(args.image)} images but {len(args.reference)} references; give one reference per image")
    check_outputs([("--csv", args.csv)], [*args.image, *args.reference, *map(label_table_path, args.reference)])
    names = args.dataset or [dataset_name(p) for p in args.image]
    if len(names) != len(args.image):
        raise InputError(f"{len(names)} dataset names for {len(args.image)} images")
    if len(set(names)) != len(names):
        raise InputError("two datasets have the same name; name them with --dataset")
    models = [load_model(m) for m in args.model]
    tables = {m.labels for m in models}
    if len(tables) != 1:
        raise InputError("the models segment different label tables; evaluate them separately")
    table = models[0].labels
    cases = []
    # Read and check every input before the (slow) segmentation: bad input fails fast.
    for name, image_path, reference_path in zip(names, args.image, args.reference):
        reference, unknown = read_segmentation(reference_path, table)
        if unknown:
            log.warning("%s: labels not in the %s table are ignored: %s", reference_path, table.region,
                        ", ".join(unknown))
        scored = labels_named_by(reference_path, table)
        if scored is not None and not scored:
            raise InputError(f"{reference_path} names none of the {table.region} model's muscles; is it a "
                             f"segmentation of another region?")
        if scored is not None and len(scored) < 2 * table.n_muscles:
            unnamed = [label.name for label in table.volume_labels() if label.value not in scored]
            log.warning("%s: not scored, as the reference does not label them: %s", name, ", ".join(unnamed))
        image = read_image(image_path)
        cases.append(EvaluationCase(name, image, reference_on_image(reference, image, name), scored))
    rows = evaluate_models(models, cases, device=args.device, progress=lambda message: log.info("%s", message))
    write_dice_csv(rows, args.csv)
    for row in rows:
        dice = "n/a" if math.isnan(row["dice"]) else f"{row['dice']:.3f}"
        print(f"{row['dataset']:<24} {row['model_version']:<24} Dice {dice}")
    print(f"{len(rows)} rows -> {args.csv}")
    return 0
