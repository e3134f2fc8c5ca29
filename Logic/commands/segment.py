"""``dafne-slicer segment``: MR volumes in, named muscle segmentations (and statistics) out.

Every problem that can be seen before any work starts (model, output names, clashes with the
inputs) stops the run with one sentence and nothing written. With several inputs, a case that
fails later is reported by name and skipped: the other cases, their statistics and previews are
still written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from dafne_logic.commands import quantitative_options
from dafne_logic.commands.output_paths import check_outputs
from dafne_logic.core.dicom_seg import DICOM_SEG_SUFFIX, require_dicom_seg_support
from dafne_logic.core.errors import DafneError, InputError
from dafne_logic.core.io import LABELMAP_SUFFIXES, SEGMENTATION_SUFFIX, check_output_path, label_table_path

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES, DICOM_SEG_SUFFIX)
INPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("--model", default="thigh", help="thigh, leg, a user model name or a model folder")
    parser.add_argument("--output", "-o", required=True,
                        help="output file (.seg.nrrd, .nii.gz, .nrrd; .dcm: DICOM SEG of a DICOM series input) "
                             "for one input; a folder for several")
    parser.add_argument("--format", default=SEGMENTATION_SUFFIX, choices=OUTPUT_SUFFIXES,
                        help="file type written into an output folder (default .seg.nrrd)")
    parser.add_argument("--stats", metavar="CSV", help="write per-muscle volume and intensity statistics")
    parser.add_argument("--preview", metavar="PNG", help="write an overlay of a few slices (one input), "
                        "or a folder of PNGs (several inputs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="slices per forward pass")
    parser.add_argument("--side", choices=("right", "left"),
                        help="side of the leg when only one leg is in the field of view (by default it "
                             "is taken from the image position, which needs the origin on the patient midline)")
    parser.add_argument("--series", help="DICOM series UID when an input folder holds several series")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    quantitative_options.register(parser)
    parser.set_defaults(func=run)


def case_name(path: Path) -> str:
    """``scan.nii.gz`` → ``scan``; a DICOM folder keeps its name (``.`` and ``..`` their real one)."""
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    for suffix in INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def plan_outputs(inputs: list[Path], output: Path, fmt: str) -> list[Path]:
    """Output path for each input; raises InputError before anything is computed.

    Refuses a file where a folder is needed and DICOM SEG without a DICOM source; outputs that would
    overwrite an input or its JSON sidecar are refused by :func:`check_outputs` in :func:`run`.
    """
    if len(inputs) == 1 and output.name.lower().endswith(OUTPUT_SUFFIXES):
        planned = [output]
    elif len(inputs) == 1 and not output.is_dir() and "." in output.name:
        check_output_path(output)  # raises with the list of known extensions
        planned = [output]
    else:
        if output.exists() and not output.is_dir():
            raise InputError(f"output {output} must be a folder when segmenting several inputs")
        names = [case_name(p) for p in inputs]
        if len(set(names)) != len(names):
            raise InputError("several inputs share a file name; segment them into separate folders")
        planned = [output / f"{name}{fmt}" for name in names]
    for source, out in zip(inputs, planned, strict=True):
        if out.name.lower().endswith(DICOM_SEG_SUFFIX) and not source.is_dir():
            raise InputError(f"{out} is a DICOM SEG, which references its source series: {source} is not a DICOM "
                             "series folder; write .seg.nrrd or a label map instead.")
    if any(out.name.lower().endswith(DICOM_SEG_SUFFIX) for out in planned):
        require_dicom_seg_support()  # before segmenting, not after
    return planned


def written_files(outputs: list[Path]) -> list[tuple[str, Path]]:
    """("--output", file) for each segmentation and each label map's JSON label table beside it."""
    files = [("--output", out) for out in outputs]
    return files + [("--output", label_table_path(out)) for out in outputs
                    if not out.name.lower().endswith((SEGMENTATION_SUFFIX, DICOM_SEG_SUFFIX))]


def check_map_options(args: argparse.Namespace, n_inputs: int) -> None:
    """Maps belong to one scan and add columns to ``--stats``: refuse them otherwise, before any work."""
    quantitative_options.check(args)
    if quantitative_options.has_maps(args) and not args.stats:
        raise InputError("--water/--fat, --fat-fraction and --map add columns to the statistics; give --stats CSV too.")
    if quantitative_options.has_maps(args) and n_inputs > 1:
        raise InputError("maps belong to one scan; segment with --water/--fat, --fat-fraction or --map one input at a time.")


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from dafne_logic.core.csa import cross_sectional_areas, write_csa_csv
    from dafne_logic.core.dicom_seg import write_dicom_seg
    from dafne_logic.core.io import read_image_and_series, write_labels
    from dafne_logic.core.labels import nothing_found_hint
    from dafne_logic.core.preprocessing import check_field_of_view
    from dafne_logic.core.preview import write_preview
    from dafne_logic.core.statistics import muscle_statistics, write_statistics_csv
    from dafne_logic.inference.confidence import Confidence, add_confidence_columns, unsure_muscles
    from dafne_logic.inference.model_package import load_model
    from dafne_logic.inference.networks import resolve_device
    from dafne_logic.inference.segment import segment_volume, segment_with_confidence

    inputs = [Path(p) for p in args.inputs]
    outputs = plan_outputs(inputs, Path(args.output), args.format)
    check_map_options(args, len(inputs))
    if args.preview and len(inputs) > 1 and Path(args.preview).exists() and not Path(args.preview).is_dir():
        raise InputError(f"--preview {args.preview} must be a folder when segmenting several inputs (one picture each).")
    check_outputs([*written_files(outputs), ("--stats", args.stats), ("--csa", args.csa),
                   ("--preview", args.preview if len(inputs) == 1 else None)],  # with several inputs: a folder
                  [*inputs, *(p.parent / f"{case_name(p)}.json" for p in inputs),  # BIDS/dcm2niix keep metadata there
                   *quantitative_options.map_files(args)])
    model = load_model(args.model)
    resolve_device(args.device)  # an unknown device, or CUDA where there is none: once, not once per input
    rows: list[dict] = []
    areas: list[dict] = []
    failures: list[str] = []
    for path, out in zip(inputs, outputs, strict=True):
        try:
            image, series = read_image_and_series(path, series_uid=args.series)
            check_field_of_view(image)  # before the progress bar: a spacing error is one sentence
            maps = quantitative_options.load_maps(args, image)  # before any work: bad maps write nothing
            with tqdm(total=100, desc=case_name(path), unit="%", disable=args.no_progress, leave=False) as bar:
                def progress(fraction: float, message: str) -> None:
                    bar.set_postfix_str(message, refresh=False)
                    bar.update(round(100 * fraction) - bar.n)

                options = dict(device=args.device, batch_size=args.batch_size, progress=progress, single_leg_side=args.side)
                # The confidence costs a little time per batch: only the statistics report it.
                labels, confidence = (segment_with_confidence(image, model, **options) if args.stats
                                      else (segment_volume(image, model, **options), Confidence()))
            # Measured before the segmentation is written: a map that misses the muscles writes nothing.
            warnings: list[str] = []
            case_rows = (muscle_statistics(image, labels, model.labels, maps=maps, erode_mm=args.erode_mm, warnings=warnings)
                         if args.stats else [])
            quantitative_options.report(maps, warnings)
            add_confidence_columns(case_rows, confidence.per_label)
            case_areas = cross_sectional_areas(labels, model.labels) if args.csa else []
            if out.name.lower().endswith(DICOM_SEG_SUFFIX):
                assert series is not None, "a .dcm output is refused up front for an input that is no DICOM folder"
                write_dicom_seg(labels, series.files, model.labels, out,
                                algorithm_name=f"DafneSlicer {model.manifest.name}",
                                algorithm_version=str(model.manifest.version))
            else:
                write_labels(labels, out, model.labels)
        except Exception as exc:  # noqa: BLE001 - one input's failure must not lose the others' results
            if len(inputs) == 1:
                raise
            if not isinstance(exc, DafneError):  # a bug or a resource limit: its traceback goes to the log
                log.exception("%s: unexpected failure", path)
            reason = str(exc) if isinstance(exc, DafneError) else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            failures.append(f"{path}: {reason}")
            print(f"{path}: failed: {reason}", file=sys.stderr)
            continue
        print(f"{path} -> {out}")
        if not sitk.GetArrayViewFromImage(labels).any():
            print(f"{path}: {nothing_found_hint(model.labels.region)}", file=sys.stderr)
        unsure = unsure_muscles(confidence.per_label, model.labels)
        if unsure:
            print(f"  the model was unsure of {', '.join(unsure)} (review = True in the statistics): check them first")
        least_sure = confidence.least_sure_slices(3)
        if least_sure:
            print(f"  it was least sure on slices {', '.join(map(str, least_sure))}")
        rows += [{"case": case_name(path), **row} for row in case_rows]
        areas += [{"case": case_name(path), **row} for row in case_areas]
        if args.preview:
            preview = Path(args.preview) if len(inputs) == 1 else Path(args.preview) / f"{case_name(path)}.png"
            try:
                write_preview(image, labels, model.labels, preview,
                              title=f"{path.name} — {model.manifest.name} v{model.manifest.version}")
            except Exception as exc:  # noqa: BLE001 - a picture must not cost the batch its statistics
                if len(inputs) == 1:
                    raise
                failures.append(f"{path}: preview: {exc}")
                print(f"{path}: preview failed: {exc}", file=sys.stderr)
    if args.stats and rows:
        write_statistics_csv(rows, args.stats)
        print(f"statistics -> {args.stats}")
    if args.csa and areas:
        write_csa_csv(areas, args.csa)
        print(f"cross-sectional areas -> {args.csa}")
    if failures:
        print(f"{len(failures)} of {len(inputs)} inputs failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
