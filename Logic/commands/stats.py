"""``dafne-slicer stats IMAGE SEGMENTATION``: per-muscle statistics as CSV (volume, intensity, maximal
cross-sectional area; fat fraction and parametric maps with ``--water/--fat``, ``--fat-fraction``, ``--map``)."""

from __future__ import annotations

import argparse
import logging

import SimpleITK as sitk

from dafne_logic.commands import quantitative_options
from dafne_logic.commands.output_paths import check_outputs
from dafne_logic.core.csa import cross_sectional_areas, write_csa_csv
from dafne_logic.core.dicom_seg import is_dicom_seg_file, read_dicom_seg
from dafne_logic.core.errors import DafneError, InputError
from dafne_logic.core.grids import resample_labels
from dafne_logic.core.io import DicomSeries, label_table_path, read_image_and_series, read_segmentation
from dafne_logic.core.labels import BUILTIN_TABLES, LabelTable
from dafne_logic.core.statistics import muscle_statistics, write_statistics_csv

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="MR volume (NIfTI, NRRD, MHA or a DICOM series folder)")
    parser.add_argument("segmentation", help=".seg.nrrd, a label map (with its JSON label table if any), or a "
                        "DICOM SEG (.dcm) of the DICOM series given as IMAGE")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="take the label table of this model (thigh, leg, a user model or a folder)")
    which.add_argument("--region", choices=sorted(BUILTIN_TABLES), help="take a built-in label table")
    parser.add_argument("--csv", required=True, metavar="OUT", help="CSV file to write")
    parser.add_argument("--series", metavar="UID", help="DICOM series to read when IMAGE holds several")
    quantitative_options.register(parser)
    parser.set_defaults(func=run)


def label_table(model: str | None, region: str | None) -> LabelTable:
    """The label table named by ``--region``, or the one in a model's manifest (``--model``)."""
    if region is not None:
        return BUILTIN_TABLES[region]
    from dafne_logic.inference.manifest import read_manifest, resolve_model_path

    return read_manifest(resolve_model_path(model)).labels


def _read_labels(args: argparse.Namespace, image: sitk.Image, series: DicomSeries | None,
                 table: LabelTable) -> tuple[sitk.Image, list[str]]:
    """The segmentation as volume labels, and the names matching none: a file, or a DICOM SEG of the
    DICOM series the image was read from (what ``segment --output x.dcm`` or a PACS sends back)."""
    if not is_dicom_seg_file(args.segmentation):
        return read_segmentation(args.segmentation, table)
    if series is None:
        raise InputError(f"{args.segmentation} is a DICOM SEG: give the DICOM series folder it segments as the "
                         "image, not a file.")
    return read_dicom_seg(args.segmentation, image, series.files, table)


def run(args: argparse.Namespace) -> int:
    quantitative_options.check(args)
    check_outputs([("--csv", args.csv), ("--csa", args.csa)],
                  [args.image, args.segmentation, label_table_path(args.segmentation), *quantitative_options.map_files(args)])
    table = label_table(args.model, args.region)
    image, series = read_image_and_series(args.image, series_uid=args.series)
    labels, unknown = _read_labels(args, image, series, table)
    if unknown:
        log.warning("not in the %s label table, left out: %s", table.region, ", ".join(unknown))
    labels = resample_labels(labels, image)
    maps = quantitative_options.load_maps(args, image)
    warnings: list[str] = []
    rows = muscle_statistics(image, labels, table, maps=maps, erode_mm=args.erode_mm, warnings=warnings)
    quantitative_options.report(maps, warnings)
    if not any(row["voxel_count"] for row in rows):
        raise DafneError(f"{args.segmentation} has no voxel of any {table.region} muscle on the image; nothing written.")
    areas = cross_sectional_areas(labels, table) if args.csa else []
    write_statistics_csv(rows, args.csv)
    if args.csa:
        write_csa_csv(areas, args.csa)
        log.info("wrote %s", args.csa)
    for row in rows:
        if row["voxel_count"]:
            fat = row.get("fat_fraction_mean")
            log.info("%-34s %9.2f ml  mean %10.2f  slices %d-%d%s", row["name"], row["volume_ml"], row["mean"],
                     row["first_slice"], row["last_slice"], "" if fat is None else f"  fat {fat:5.1f} %")
    log.info("wrote %s", args.csv)
    return 0
