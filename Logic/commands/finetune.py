"""``dafne-slicer finetune``: learn from one corrected segmentation; write a child model and its delta."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from tqdm import tqdm

from dafne_logic.core.errors import InputError

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="thigh, leg, a user model name or a model folder (the parent)")
    parser.add_argument("--image", required=True, help="the MR volume the correction was drawn on")
    parser.add_argument("--segmentation", required=True,
                        help="corrected segmentation: .seg.nrrd or a label map (+ JSON label table); "
                             "labels are matched by name")
    parser.add_argument("--slices", default="auto",
                        help="'auto' (slices with most muscles drawn, per leg) or 0-based image slices, e.g. '3,5,10-14'")
    parser.add_argument("--output-model", required=True, metavar="DIR",
                        help="folder for the new model package, its delta and metadata")
    parser.add_argument("--seed", type=int, default=0, help="seed of augmentation and batch order")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default from the fine-tuning config)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    parser.add_argument("--ignore-unknown-labels", action="store_true",
                        help="train although some segments match no muscle of the model (they become background)")
    parser.add_argument("--series", help="DICOM series UID when the image folder holds several series")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dafne_logic.core.atomic import check_replaceable
    from dafne_logic.core.io import read_image, read_segmentation
    from dafne_logic.core.paths import same_location
    from dafne_logic.core.slice_selection import parse_slice_list
    from dafne_logic.inference.manifest import MANIFEST_NAME
    from dafne_logic.inference.model_package import PACKAGE_FOLDER, load_model
    from dafne_logic.learning.delta import DELTA_NAME
    from dafne_logic.learning.finetune import FinetuneConfig, finetune_on_corrections

    slices = parse_slice_list(args.slices)
    output = Path(args.output_model)
    model = load_model(args.model)
    if model.path is not None and same_location(output, model.path):
        raise InputError(f"{output} is the parent model's folder; choose another --output-model")
    check_replaceable(output, MANIFEST_NAME, PACKAGE_FOLDER)  # before the minutes of training, not after
    image = read_image(args.image, series_uid=args.series)
    labels, unknown = read_segmentation(args.segmentation, model.labels)
    if unknown:
        names = ", ".join(repr(n) for n in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        if not args.ignore_unknown_labels:
            raise InputError(f"the segmentation has labels the {model.manifest.region} model does not know: {names}; "
                             f"rename them or pass --ignore-unknown-labels")
        log.warning("ignoring labels the model does not know: %s", names)
    config = FinetuneConfig(device=args.device)
    if args.epochs is not None:
        config = replace(config, max_epochs=args.epochs)
    with tqdm(total=100, desc="fine-tuning", unit="%", disable=args.no_progress, leave=False) as bar:
        def progress(fraction: float, message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        result = finetune_on_corrections(model, image, labels, slices=slices, seed=args.seed, progress=progress,
                                         config=config)
    result.save(output)
    report = result.report
    print(f"fine-tuned {model.manifest.name} {report['parent_version']} -> {report['version']} on "
          f"{report['n_leg_slices']} leg-slices from {report['n_slices']} image slices "
          f"({report['epochs']} epochs, {report['stop_reason']}, {report['seconds']:.1f} s)")
    print(f"Dice automatic vs corrected on those slices: {_fmt(report['mean_dice_before'])}; "
          f"after fine-tuning: {_fmt(report['mean_dice_after'])}")
    if report["n_held_out"]:
        print(f"on the {report['n_held_out']} held-out leg-slices (not trained on): "
              f"{_fmt(report['mean_dice_held_out_before'])} -> {_fmt(report['mean_dice_held_out_after'])}")
    print(f"model -> {output}; delta -> {output / DELTA_NAME} ({report['delta_megabytes']:.2f} MB)")
    return 0


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"
