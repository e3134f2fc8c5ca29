"""Segment every MR volume of a folder inside Slicer, without the GUI.

    Slicer --no-main-window --python-script batch_segment.py --model thigh [--side right] INPUT_DIR OUTPUT_DIR

Each NIfTI/NRRD/MHA file or DICOM series folder of INPUT_DIR becomes ``OUTPUT_DIR/<name>.seg.nrrd``
(written by Slicer's segmentation storage node: named, coloured, coded segments), and all volumes'
per-muscle statistics go to ``OUTPUT_DIR/statistics.csv``. A folder holding several series fails
with their list: put each series in its own folder. OUTPUT_DIR reflects the run: an earlier run's
result of a case that fails now is renamed ``<name>.seg.nrrd.previous``, and ``statistics.csv``
holds this run's cases (none: removed). The same as, outside Slicer:

    dafne-slicer segment INPUT_DIR/* --model thigh -o OUTPUT_DIR --stats OUTPUT_DIR/statistics.csv

Exit status: 0 all segmented, 1 some inputs failed (listed), 2 unusable arguments, missing packages or
an unexpected error. Slicer stays open after ``--python-script`` unless the script exits, so the script
always ends with ``slicer.util.exit(status)``, whatever happens.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]  # DafneSlicer/ (dafne_logic is installed beside it)
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
import DafneSlicerLib  # noqa: E402, F401 - first: in a source checkout it makes ../Logic importable as dafne_logic

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_inputs(folder: Path, output_dir: Path | None = None) -> list[Path]:
    """Image files (not segmentations) and sub-folders (DICOM series) of ``folder``, sorted by name.

    Not inputs: ``output_dir``, any earlier batch's output folder inside ``folder`` (batch outputs and
    no DICOM series; the next run would fail on it), and hidden folders.
    """
    skip = output_dir.resolve() if output_dir is not None else None
    return sorted(p for p in folder.iterdir()
                  if (p.is_dir() and p.resolve() != skip and not p.name.startswith(".") and not _batch_output(p))
                  or (p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.lower().endswith(".seg.nrrd")))


def _batch_output(folder: Path) -> bool:
    """Whether ``folder`` is an earlier batch's output: it holds what a batch writes and no DICOM series (a
    case folder that also keeps a corrected ``.seg.nrrd`` is a case; an output folder with a spreadsheet or
    a note beside the statistics is still an output)."""
    from dafne_logic.core.io import list_dicom_series

    names = [p.name.lower() for p in folder.iterdir() if p.is_file()]
    wrote = any(name == "statistics.csv" or name.endswith((".seg.nrrd", ".seg.nrrd.previous")) for name in names)
    return wrote and not list_dicom_series(folder)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--model", default="thigh", help="thigh, leg, or a user / pulled model name")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--side", default="auto", choices=("auto", "right", "left"),
                        help="side of the leg when only one is in the field of view (auto: from its position, "
                             "which needs the image origin on the patient midline)")
    return parser.parse_args(argv)


def main(argv: list[str], scene=None) -> int:
    """Run the batch; ``scene`` defaults to Slicer's scene (tests pass a bare MRML scene)."""
    import slicer

    from dafne_logic.commands.segment import case_name
    from dafne_logic.core.errors import DafneError
    from dafne_logic.core.io import SeveralSeriesError, read_image
    from dafne_logic.core.statistics import muscle_statistics, write_statistics_csv
    from dafne_logic.inference.confidence import add_confidence_columns
    from dafne_logic.inference.networks import resolve_device
    from DafneSlicerLib import mrml_conversion as mc
    from DafneSlicerLib.install_logic import InstallLogic, read_requirements
    from DafneSlicerLib.segmentation_logic import SegmentationLogic, single_leg_side
    from DafneSlicerLib.slicer_packaging import SlicerPackaging

    scene = scene if scene is not None else slicer.mrmlScene
    args = parse_args(argv)
    if not args.input_dir.is_dir():
        print(f"error: {args.input_dir} is not a folder", file=sys.stderr)
        return 2
    missing = InstallLogic(SlicerPackaging(), read_requirements()).missing()
    if missing:
        print(f"error: not installed in Slicer's Python: {', '.join(missing)}; open the DafneSlicer module once "
              "and click Install dependencies", file=sys.stderr)
        return 2
    inputs = find_inputs(args.input_dir, args.output_dir)
    if not inputs:
        print(f"error: no image files or DICOM folders in {args.input_dir}", file=sys.stderr)
        return 2
    names = [case_name(p) for p in inputs]  # OUTPUT_DIR is a folder whatever its name (results.v1 too)
    if len({name.casefold() for name in names}) != len(names):  # macOS and Windows disks fold case
        print("error: several inputs share a name (e.g. scan.nii and scan.nrrd); put them in separate folders",
              file=sys.stderr)
        return 2
    outputs = [args.output_dir / f"{name}.seg.nrrd" for name in names]
    if args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"error: {args.output_dir} is a file; give a folder for the results", file=sys.stderr)
        return 2
    try:
        segmentation_logic = SegmentationLogic()
        model = segmentation_logic.load_model(args.model)
        resolve_device(args.device)  # an unknown device, or CUDA where there is none: once, not once per input
    except DafneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot make the folder {args.output_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    rows, failed = [], []
    for source, target in zip(inputs, outputs, strict=True):
        began = time.monotonic()
        volume = segmentation = None
        try:
            image = read_image(source)
            volume = slicer.vtkMRMLScalarVolumeNode()
            volume.SetName(target.name.split(".")[0])
            scene.AddNode(volume)
            mc.update_volume_node_from_image(volume, image)
            labels, confidence = segmentation_logic.segment(image, model, args.device, lambda f, m: None, lambda: False,
                                                            single_leg_side=single_leg_side(args.side))
            segmentation = mc.labels_to_segmentation(scene, labels, model.labels, volume, volume.GetName())
            mc.save_segmentation(segmentation, str(target))
            case_rows = muscle_statistics(image, labels, model.labels)
            add_confidence_columns(case_rows, confidence.per_label)  # review = True: the model was unsure of it
            rows += [{"case": case_name(source), **row} for row in case_rows]  # as dafne-slicer segment names it
            print(f"{source.name}: {target} ({time.monotonic() - began:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            failed.append(source.name)
            reason = str(exc) if isinstance(exc, DafneError) else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            if isinstance(exc, SeveralSeriesError):  # the batch has no --series: one series per folder
                reason = f"{exc.folder} holds {exc.count} DICOM series ({exc.listing}); put each in its own folder"
            if target.is_file():  # an earlier run's result would sit beside this run's statistics as if current
                aside = target.with_name(target.name + ".previous")  # kept: it may have been corrected by hand
                target.replace(aside)
                reason += f" (the earlier result is now {aside.name})"
            print(f"{source.name}: FAILED: {reason}", file=sys.stderr)
        finally:  # one case at a time in memory, display nodes included
            for node in (segmentation, volume):
                if node is not None:
                    for index in reversed(range(node.GetNumberOfDisplayNodes())):
                        scene.RemoveNode(node.GetNthDisplayNode(index))
                    scene.RemoveNode(node)
    statistics = args.output_dir / "statistics.csv"
    if rows:
        write_statistics_csv(rows, statistics)
    elif statistics.is_file():  # an earlier run's, about cases this run could not segment
        statistics.unlink()
    print(f"{len(inputs) - len(failed)} of {len(inputs)} volumes segmented into {args.output_dir}")
    return 1 if failed else 0


def run(argv: list[str], exit: Callable[[int], None], scene=None) -> None:
    """Run :func:`main`, then always call ``exit(status)`` (Slicer's ``slicer.util.exit``): an
    exception must not leave a ``--no-main-window`` Slicer running for ever."""
    try:
        status = main(argv, scene=scene)
    except SystemExit as exc:  # argparse: --help (0) or unusable arguments (2)
        status = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - whatever happens, Slicer must exit
        traceback.print_exc()
        print("error: the batch stopped on an unexpected error (traceback above)", file=sys.stderr)
        status = 2
    exit(status)


if __name__ == "__main__":
    import slicer

    run(sys.argv[1:], slicer.util.exit)
