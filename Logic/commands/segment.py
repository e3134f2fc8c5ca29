"""``dafne-slicer segment``: MR volumes in, named muscle segmentations (and statistics) out."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError

OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--model", default="thigh", help="thigh, leg, a user model name or a model folder")
    parser.add_argument("--output", "-o", required=True,
                        help="output file (.seg.nrrd, .nii.gz, .nrrd) for one input; a folder for several")
    parser.add_argument("--format", default=".seg.nrrd", choices=OUTPUT_SUFFIXES,
                        help="file type written into an output folder (default .seg.nrrd)")
    parser.add_argument("--stats", metavar="CSV", help="write per-muscle volume and intensity statistics")
    parser.add_argument("--preview", metavar="PNG", help="write an overlay of a few slices (one input), "
                        "or a folder of PNGs (several inputs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--series", help="DICOM series UID when an input folder holds several series")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _stem(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (".nii.gz", ".seg.nrrd") + OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def plan_outputs(inputs: list[Path], output: Path, fmt: str) -> list[Path]:
    """Output path for each input; raises InputError before anything is computed."""
    if len(inputs) == 1 and output.name.endswith(OUTPUT_SUFFIXES):
        return [output]
    if len(inputs) == 1 and not output.is_dir() and "." in output.name:
        raise InputError(f"output {output} has an unknown extension; use one of {', '.join(OUTPUT_SUFFIXES)}")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} must be a folder when segmenting several inputs")
    names = [_stem(p) for p in inputs]
    if len(set(names)) != len(names):
        raise InputError("several inputs share a file name; segment them into separate folders")
    return [output / f"{name}{fmt}" for name in names]


def run(args: argparse.Namespace) -> int:
    from ..inference import segment_volume
    from ..io import read_image, write_labels
    from ..model_package import load_model
    from ..preview import write_preview
    from ..statistics import muscle_statistics, write_statistics_csv

    inputs = [Path(p) for p in args.inputs]
    outputs = plan_outputs(inputs, Path(args.output), args.format)
    model = load_model(args.model)
    # Read and validate every input before writing anything: bad input leaves no output behind.
    images = [read_image(p, series_uid=args.series) for p in inputs]
    rows: list[dict] = []
    for path, image, out in zip(inputs, images, outputs):
        with tqdm(total=100, desc=_stem(path), unit="%", disable=args.no_progress, leave=False) as bar:
            def progress(fraction: float, message: str) -> None:
                bar.set_postfix_str(message, refresh=False)
                bar.update(round(100 * fraction) - bar.n)

            labels = segment_volume(image, model, device=args.device, batch_size=args.batch_size, progress=progress)
        write_labels(labels, out, model.labels)
        print(f"{path} -> {out}")
        if args.stats:
            rows += [{"case": _stem(path), **row} for row in muscle_statistics(image, labels, model.labels)]
        if args.preview:
            preview = Path(args.preview) if len(inputs) == 1 else Path(args.preview) / f"{_stem(path)}.png"
            write_preview(image, labels, model.labels, preview,
                          title=f"{path.name} — {model.manifest.name} v{model.manifest.version}")
    if args.stats:
        write_statistics_csv(rows, args.stats)
        print(f"statistics -> {args.stats}")
    return 0
