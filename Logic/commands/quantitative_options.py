"""The map options shared by ``dafne-slicer stats`` and ``dafne-slicer segment``.

``--water W --fat F`` or ``--fat-fraction FF``, ``--map NAME=FILE`` (repeatable), ``--erode-mm X``
and ``--csa OUT.csv`` (see :mod:`dafne_logic.core.quantitative` and :mod:`dafne_logic.core.csa`).
"""

from __future__ import annotations

import argparse
import logging
import math

import SimpleITK as sitk

from dafne_logic.core.errors import InputError
from dafne_logic.core.quantitative import (
    DEFAULT_ERODE_MM,
    FAT_FRACTION,
    QuantitativeMap,
    build_maps,
    check_map_name,
    read_map,
)

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    """Add the map, erosion and cross-sectional-area options to a subcommand's parser."""
    group = parser.add_argument_group("per-muscle maps (co-registered with the image)")
    group.add_argument("--water", metavar="W", help="Dixon water image (with --fat): fat fraction 100·F/(W+F) in percent")
    group.add_argument("--fat", metavar="F", help="Dixon fat image (with --water)")
    group.add_argument("--fat-fraction", metavar="FF", help="scanner-made fat-fraction map (0–1 or 0–100, detected)")
    group.add_argument("--map", action="append", default=[], metavar="NAME=FILE",
                       help="any parametric map (T2, T1, ADC, ...): columns NAME_mean, NAME_median, NAME_sd; repeatable")
    group.add_argument("--nan-as-missing", action="store_true",
                       help="NaN or infinite voxels in the maps mean 'no value here' (failed fits, masked "
                            "background) and are left out; by default such maps are refused")
    group.add_argument("--erode-mm", type=float, default=DEFAULT_ERODE_MM, metavar="X",
                       help=f"leave out voxels within X mm of each muscle's outline, in-plane (default {DEFAULT_ERODE_MM:g})")
    group.add_argument("--csa", metavar="OUT.csv", help="write the cross-sectional area of each muscle on every axial slice")


def has_maps(args: argparse.Namespace) -> bool:
    return bool(args.water or args.fat or args.fat_fraction or args.map)


def check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Refuse inconsistent options before any work; return the ``--map`` options as (name, path)."""
    if bool(args.water) != bool(args.fat):
        raise InputError("--water and --fat go together (the two images of one Dixon scan).")
    if args.water and args.fat_fraction:
        raise InputError("give either --water/--fat or --fat-fraction, not both.")
    if not (math.isfinite(args.erode_mm) and args.erode_mm >= 0):  # NaN would erode every voxel away
        raise InputError(f"--erode-mm must be a non-negative number of mm, not {args.erode_mm:g}.")
    pairs: list[tuple[str, str]] = []
    taken = {FAT_FRACTION}
    for option in args.map:
        name, sep, path = option.partition("=")
        if not sep or not path:
            raise InputError(f"--map {option!r} must read NAME=FILE, e.g. --map T2=t2_map.nii.gz.")
        taken.add(check_map_name(name, taken))
        pairs.append((name, path))
    return pairs


def map_files(args: argparse.Namespace) -> list[str]:
    """Every map file the options name (inputs that no output may replace)."""
    return [p for p in (args.water, args.fat, args.fat_fraction) if p] + [path for _, path in check(args)]


def load_maps(args: argparse.Namespace, reference: sitk.Image) -> list[QuantitativeMap]:
    """The maps the options name, on ``reference``'s grid (fat fraction first); one sentence on bad input."""
    pairs = check(args)

    def read(path: str | None, what: str) -> sitk.Image | None:
        return None if path is None else read_map(path, what, args.nan_as_missing)

    maps = build_maps(reference, water=read(args.water, "water"), fat=read(args.fat, "fat"),
                      fat_fraction=read(args.fat_fraction, "fat-fraction"),
                      others=[(name, read_map(path, name, args.nan_as_missing)) for name, path in pairs],
                      missing_as_nan=args.nan_as_missing)
    return maps


def report(maps: list[QuantitativeMap], warnings: list[str]) -> None:
    """Log how each map's values were made (units, scale detected), then the warnings of the measurement
    (``muscle_statistics(..., warnings=...)``: muscles without a value, maps covering part of one).
    Called once measured, so that a map refused while measuring gives its one sentence alone."""
    for quantity in maps:
        log.info("%s", quantity.note)
    for line in warnings:
        log.warning("%s", line)
