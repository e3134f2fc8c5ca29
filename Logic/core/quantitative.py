"""Per-muscle quantities from co-registered maps: Dixon fat fraction, any parametric map, edge erosion.

A *map* is a scalar volume registered to the scan (same patient position): a Dixon water and fat
pair, a scanner-made fat-fraction map, a T2, T1 or ADC map. Maps on another grid are carried onto
the segmentation's grid by physical position (linear interpolation; voxels the map does not cover
become NaN and are left out); a map that covers no segmented voxel is refused.

Fat fraction is in percent, 100·F/(W+F) per voxel. Where W+F is below a noise floor (a fraction
:data:`NOISE_FLOOR_FRACTION` of the 99th percentile of W+F in the whole volume) the ratio is noise
over noise (about 50 %), so those voxels are left out rather than averaged in.

Edge erosion removes, per muscle and per slice (in the acquisition plane), the voxels closer than
``erode_mm`` to the muscle's outline: partial volume with fascia and intermuscular or subcutaneous
fat at the edge raises a muscle's fat fraction (see ``Docs/quantitative.md`` for the measurement
behind :data:`DEFAULT_ERODE_MM`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.core.grids import same_grid
from dafne_logic.core.io import PathLike, SeveralSeriesError, read_image, validate_image
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.preprocessing import canonical, canonical_array_on_input

NOISE_FLOOR_FRACTION = 0.05  # of the 99th percentile of W+F: background air sits far below, muscle far above
# In-plane edge erosion (mm): bench/bench_fat_fraction.py, automatic segmentations of infiltrated
# phantoms (bench/results/fat_fraction.txt): the smallest erosion within 0.1 point of the lowest mean error.
DEFAULT_ERODE_MM = 2.0
PARTIAL_COVER = 0.5  # a map with values on less of a muscle's measured voxels than this is reported
FAT_FRACTION = "fat_fraction"  # column prefix of the fat fraction
SUMMARY_FIELDS = ("mean", "median", "sd")
_MAP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantitativeMap:
    """One map on the segmentation's grid, ready to summarise per muscle."""

    name: str  # column prefix, e.g. "fat_fraction", "T2"
    values: np.ndarray  # (z, y, x) float64 on the segmentation grid; NaN where undefined (outside, noise)
    note: str  # how the values were made, one line for the log (units, scale detected)
    noise_floor: bool = False  # whether low-signal voxels were left out (the Dixon fat fraction only)


# --- reading maps ---------------------------------------------------------------------------------


def read_map(path: PathLike, what: str, missing_as_nan: bool = False) -> sitk.Image:
    """A validated 3D scalar map (see :func:`dafne_logic.core.io.read_image`); ``what`` names it in errors.

    ``missing_as_nan``: NaN and infinite voxels mean "no value here" (left out of every summary)."""
    try:
        return read_image(path, missing_as_nan=missing_as_nan)
    except SeveralSeriesError as exc:  # --series picks the image's series, not a map's
        raise InputError(f"{what} map: {exc.folder} holds {exc.count} DICOM series: {exc.listing}; give the map as "
                         "a folder holding its series alone (or as a NIfTI or NRRD file).") from exc
    except InputError as exc:
        raise InputError(f"{what} map: {exc}") from exc


def check_map_name(name: str, taken: set[str]) -> str:
    """``name`` if it can prefix CSV columns (letters, digits, single underscores) and is not taken."""
    if not _MAP_NAME.fullmatch(name):
        raise InputError(f"map name {name!r} must start with a letter and hold only letters, digits and single "
                         "underscores (it prefixes the CSV columns NAME_mean, NAME_median, NAME_sd).")
    if name.lower() in {t.lower() for t in taken}:
        raise InputError(f"map name {name!r} is used twice (or clashes with the fat fraction); give each map its own name.")
    return name


def map_on_grid(image: sitk.Image, reference: sitk.Image, what: str, reference_name: str = "image") -> np.ndarray:
    """``image``'s voxels on ``reference``'s grid, (z, y, x) float64; NaN where ``image`` has no data.

    Same grid: the voxels as they are. Otherwise resampled by physical position (linear); a map whose
    physical extent does not overlap the reference at all is refused with one sentence.
    """
    if same_grid(image, reference):
        values = sitk.GetArrayFromImage(image).astype(np.float64)
    else:
        _require_overlap(image, reference, what, reference_name)
        moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat64), reference, sitk.Transform(), sitk.sitkLinear,
                              float("nan"), sitk.sitkFloat64)
        values = sitk.GetArrayFromImage(moved)
    values[~np.isfinite(values)] = np.nan  # a map read with missing values (--nan-as-missing): Inf is missing too
    return values


def _require_overlap(image: sitk.Image, reference: sitk.Image, what: str, reference_name: str = "image") -> None:
    """Refuse, with one sentence, a map whose physical extent misses ``reference``'s altogether."""
    if not same_grid(image, reference) and not _boxes_overlap(image, reference):
        raise InputError(f"the {what} map does not overlap the {reference_name} (its physical extent lies elsewhere); "
                         "give a map registered to this scan.")


def _corners(image: sitk.Image) -> np.ndarray:
    """The 8 corners of the voxel grid's outer faces (index ± 0.5) in physical mm, (8, 3)."""
    size = np.array(image.GetSize(), float)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float) * size - 0.5
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])


def _boxes_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether the physical bounding boxes of two grids intersect (axis-aligned boxes of their corners)."""
    ca, cb = _corners(a), _corners(b)
    return bool(np.all(ca.min(0) < cb.max(0)) and np.all(cb.min(0) < ca.max(0)))


def _check_non_negative(image: sitk.Image, what: str) -> None:
    low = float(np.nanmin(sitk.GetArrayViewFromImage(image)))
    if low < 0:
        raise InputError(f"the {what} image has negative values (down to {low:g}); Dixon water and fat images "
                         "must be magnitude images.")


# --- fat fraction ---------------------------------------------------------------------------------


def dixon_fat_fraction(water: np.ndarray, fat: np.ndarray,
                       noise_floor_fraction: float = NOISE_FLOOR_FRACTION) -> np.ndarray:
    """Fat fraction in percent, 100·F/(W+F), of magnitude Dixon images (same shape, any units).

    Voxels where W+F is below ``noise_floor_fraction`` × the 99th percentile of W+F are NaN.
    """
    total = water.astype(np.float64) + fat
    floor = noise_floor_fraction * float(np.nanpercentile(total, 99))  # NaN: a voxel without a value
    return np.divide(100.0 * fat, total, out=np.full(total.shape, np.nan), where=total > floor)


def fat_fraction_from_dixon(water: sitk.Image, fat: sitk.Image, reference: sitk.Image) -> QuantitativeMap:
    """The fat-fraction map (percent) of a Dixon pair, on ``reference``'s grid.

    The fat image is carried onto the water image's grid when they differ; the ratio is taken there
    (each image's own voxels) and the result carried onto ``reference``.
    """
    _check_non_negative(water, "water")
    _check_non_negative(fat, "fat")
    for image, what in ((water, "water"), (fat, "fat")):  # each against the scan first: says which one is astray
        _require_overlap(image, reference, what)
    fat_on_water = map_on_grid(fat, water, "fat", "water image")
    percent = dixon_fat_fraction(sitk.GetArrayFromImage(water), np.nan_to_num(fat_on_water, nan=0.0))
    percent[np.isnan(fat_on_water)] = np.nan
    ff_image = sitk.GetImageFromArray(percent)
    ff_image.CopyInformation(water)
    return QuantitativeMap(FAT_FRACTION, map_on_grid(ff_image, reference, "Dixon"),
                           f"fat fraction 100·F/(W+F) in percent, voxels with W+F under "
                           f"{NOISE_FLOOR_FRACTION:.0%} of its 99th percentile left out", noise_floor=True)


def fat_fraction_from_map(image: sitk.Image, reference: sitk.Image) -> QuantitativeMap:
    """A scanner-made fat-fraction map on ``reference``'s grid, in percent, its scale detected.

    A map whose 99.5th percentile is at most 1.5 holds fractions (0–1, multiplied by 100); up to
    150 percent (0–100). Anything larger is refused: it is not a fat-fraction map in either scale.
    The percentile is taken over the finite non-zero voxels: a map masked to the body or to a region
    of interest is mostly exact zeros, which would make any scale look like fractions.
    """
    voxels = sitk.GetArrayViewFromImage(image)
    valued = voxels[np.isfinite(voxels) & (voxels != 0)]
    top = float(np.percentile(valued, 99.5)) if valued.size else 0.0
    if top <= 1.5:
        scale, note = 100.0, "fat-fraction map read as fractions 0–1 (99.5th percentile {:.3g}), shown in percent"
    elif top <= 150.0:
        scale, note = 1.0, "fat-fraction map read as percent 0–100 (99.5th percentile {:.3g})"
    else:
        raise InputError(f"the fat-fraction map reaches {top:g} (99.5th percentile); a fat fraction lies in 0–1 "
                         "or 0–100, so rescale the map first.")
    return QuantitativeMap(FAT_FRACTION, scale * map_on_grid(image, reference, "fat-fraction"), note.format(top))


def parametric_map(name: str, image: sitk.Image, reference: sitk.Image) -> QuantitativeMap:
    """Any map (T2, T1, ADC, ...) on ``reference``'s grid, in the map's own units."""
    return QuantitativeMap(name, map_on_grid(image, reference, name), f"{name} map in its own units")


def build_maps(reference: sitk.Image, *, water: sitk.Image | None = None, fat: sitk.Image | None = None,
               fat_fraction: sitk.Image | None = None,
               others: Sequence[tuple[str, sitk.Image]] = (), missing_as_nan: bool = False) -> list[QuantitativeMap]:
    """The maps a user picked (files or Slicer volumes), validated and carried onto ``reference``'s grid.

    A Dixon pair (``water`` and ``fat``) or a scanner ``fat_fraction`` map gives the fat fraction
    (first); ``others`` are (name, map) pairs. Every image must be a usable 3D scalar volume
    (:func:`~dafne_logic.core.io.validate_image`: no NaN, not 4D, not constant; ``missing_as_nan``:
    NaN and infinite voxels allowed, as voxels without a value). One sentence (InputError) for
    anything unusable.
    """
    if (water is None) != (fat is None):
        raise InputError("the water and fat images go together (the two images of one Dixon scan).")
    if water is not None and fat_fraction is not None:
        raise InputError("give either the Dixon water and fat images or a fat-fraction map, not both.")
    named = [("water", water), ("fat", fat), ("fat-fraction", fat_fraction), *others]
    for what, image in named:
        if image is not None:
            validate_image(image, f"the {what} map", missing_as_nan)
    taken = {FAT_FRACTION}
    for name, _ in others:
        taken.add(check_map_name(name, taken))
    maps = []
    if water is not None and fat is not None:
        maps.append(fat_fraction_from_dixon(water, fat, reference))
    elif fat_fraction is not None:
        maps.append(fat_fraction_from_map(fat_fraction, reference))
    return maps + [parametric_map(name, image, reference) for name, image in others]


# --- erosion and per-muscle summaries -------------------------------------------------------------


def erode_labels_axially(labels: sitk.Image, erode_mm: float) -> np.ndarray:
    """:func:`erode_labels_in_plane` on the labels' axial slices, returned as (z, y, x) on their own grid.

    The axial plane holds a muscle's cross-section, whatever plane the scan was acquired in: a coronal
    or sagittal volume stores the muscle's long axis in its slices, and eroding there would cut its
    ends and spare its anterior or posterior outline. The axes are put axial (LPS) exactly, by
    permutation and flips, as segmentation does, and put back after.
    """
    axial = canonical(labels)
    spacing = axial.GetSpacing()
    eroded = erode_labels_in_plane(sitk.GetArrayFromImage(axial), (spacing[0], spacing[1]), erode_mm)
    return np.ascontiguousarray(canonical_array_on_input(eroded, labels, axial))


def erode_labels_in_plane(labels: np.ndarray, spacing_xy: tuple[float, float], erode_mm: float) -> np.ndarray:
    """Labels (z, y, x) with each label's voxels within ``erode_mm`` of its in-plane outline set to 0.

    Per label and per slice, a voxel is kept when the Euclidean distance (mm, pixel centres,
    ``spacing_xy`` = (x, y) mm) from it to the nearest voxel of another value exceeds ``erode_mm``;
    a boundary voxel is one pixel from the outside, so ``erode_mm`` under one pixel keeps everything.
    The slice axis is never eroded: on axial slices (:func:`erode_labels_axially`) muscles run along it,
    and slices are often thick.
    """
    if not (math.isfinite(erode_mm) and erode_mm >= 0):
        raise InputError(f"--erode-mm must be a non-negative number of mm, not {erode_mm:g}.")
    if erode_mm == 0:
        return labels
    eroded = np.zeros_like(labels)
    sampling = (spacing_xy[1], spacing_xy[0])
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # Pad by one voxel in-plane so every slice of the crop holds an outside voxel.
        z, y, x = box
        y = slice(max(y.start - 1, 0), y.stop + 1)
        x = slice(max(x.start - 1, 0), x.stop + 1)
        crop = labels[z, y, x]
        padded = np.pad(crop == value, ((0, 0), (1, 1), (1, 1)))  # the edge of the volume is outside too
        for k in range(padded.shape[0]):
            depth = ndimage.distance_transform_edt(padded[k], sampling=sampling)[1:-1, 1:-1]
            keep = depth > erode_mm
            eroded[z.start + k, y, x][keep] = value
    return eroded


def summarise_by_label(values: np.ndarray, labels: np.ndarray, n_labels: int) -> dict[int, dict[str, Any]]:
    """Mean, median, sample SD (n−1) and voxel count of the finite ``values`` per label 1..``n_labels``.

    ``values`` and ``labels`` are arrays of one shape. Labels without a finite value get None
    (and SD is None for one voxel); the count is always there.
    """
    inside = (labels > 0) & (labels <= n_labels) & np.isfinite(values)
    keys, samples = labels[inside].astype(np.intp), values[inside].astype(np.float64)
    order = np.argsort(keys, kind="stable")
    keys, samples = keys[order], samples[order]
    counts = np.bincount(keys, minlength=n_labels + 1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    result = {}
    for value in range(1, n_labels + 1):
        run = samples[starts[value]:starts[value + 1]]
        n = run.size
        result[value] = {
            "mean": float(run.mean()) if n else None,
            "median": float(np.median(run)) if n else None,
            "sd": float(run.std(ddof=1)) if n > 1 else None,
            "voxels": int(n),
        }
    return result


def quantitative_columns(labels: sitk.Image, maps: list[QuantitativeMap], table: LabelTable,
                         erode_mm: float = DEFAULT_ERODE_MM, warnings: list[str] | None = None) -> dict[int, dict[str, Any]]:
    """Per volume label, the columns ``NAME_mean``, ``NAME_median``, ``NAME_sd`` of every map.

    The fat fraction also gets ``fat_fraction_voxels`` (voxels used: after erosion and the noise
    floor). ``labels`` holds volume labels of ``table`` on the grid the maps were carried onto.
    Raises InputError when a map has no value on any segmented voxel (it misses the muscles).
    ``warnings``, if given, receives one line per map that leaves segmented muscles without a value
    or covers under :data:`PARTIAL_COVER` of one's measured voxels (see :func:`cover_warnings`);
    without it they are logged.
    """
    columns: dict[int, dict[str, Any]] = {label.value: {} for label in table.volume_labels()}
    if not maps:
        return columns
    label_voxels = sitk.GetArrayViewFromImage(labels)
    n_labels = 2 * table.n_muscles
    eroded = erode_labels_axially(labels, erode_mm)
    # The same for every map: which voxels are muscle, and each muscle's voxels before and after erosion.
    segmented = (label_voxels > 0) & (label_voxels <= n_labels)
    counts = (_per_label_counts(label_voxels, n_labels), _per_label_counts(eroded, n_labels))
    for quantity in maps:
        if quantity.values.shape != label_voxels.shape:
            raise ValueError(f"{quantity.name} is {quantity.values.shape}, the labels {label_voxels.shape}")
        # No muscle at all is the caller's to say (wrong region, empty result), not the map's fault.
        if segmented.any() and not np.isfinite(quantity.values[segmented]).any():
            why = "all of them lie under its noise floor" if quantity.noise_floor else "its values there are all missing"
            raise InputError(f"the {quantity.name} map has no value on any segmented muscle voxel "
                             f"(it does not overlap the muscles, or {why}).")
        summaries = summarise_by_label(quantity.values, eroded, n_labels)
        lines = cover_warnings(quantity, summaries, *counts, table, erode_mm)
        if warnings is None:  # a caller that does not collect them (a script): logged, not lost
            for line in lines:
                log.warning("%s", line)
        else:
            warnings.extend(lines)
        for value, summary in summaries.items():
            row = columns[value]
            row.update({f"{quantity.name}_{field}": summary[field] for field in SUMMARY_FIELDS})
            if quantity.name == FAT_FRACTION:
                row[f"{FAT_FRACTION}_voxels"] = summary["voxels"]
    return columns


def _per_label_counts(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxels of each volume label 0..``n_labels`` (index = label; 0 and labels beyond left at 0), (n_labels + 1,)."""
    return np.bincount(labels[(labels > 0) & (labels <= n_labels)].astype(np.intp), minlength=n_labels + 1)


def cover_warnings(quantity: QuantitativeMap, summaries: dict[int, dict[str, Any]], segmented: np.ndarray,
                   measured: np.ndarray, table: LabelTable, erode_mm: float) -> list[str]:
    """What a user should know about where ``quantity`` had no values, one line per kind (0–2 lines).

    ``summaries`` (:func:`summarise_by_label` of the map over the eroded labels); ``segmented`` and
    ``measured``: each volume label's voxel count before and after erosion (index = label). Muscles
    segmented but left without any value (eroded away, outside the map, values missing) get empty
    cells; muscles where the map has values on under :data:`PARTIAL_COVER` of the voxels measured (a
    map of a few slices) get figures of that part only.
    """
    names = {label.value: label.name for label in table.volume_labels()}
    empty = [names[v] for v, summary in summaries.items() if segmented[v] and not summary["voxels"]]
    partial = [f"{names[v]} ({100 * summary['voxels'] / measured[v]:.0f} %)" for v, summary in summaries.items()
               if 0 < summary["voxels"] < PARTIAL_COVER * measured[v]]
    missing = "they lie under its noise floor" if quantity.noise_floor else "its values there are missing"
    eroded_away = f"eroded away by the {erode_mm:g} mm erosion, " if erode_mm > 0 else ""
    lines = []
    if empty:
        lines.append(f"{quantity.name}: no value left in {', '.join(empty)} ({eroded_away}outside the map, or "
                     f"{missing}); their cells are empty")
    if partial:
        lines.append(f"{quantity.name}: values on under {round(100 * PARTIAL_COVER)} % of the voxels measured in "
                     f"{', '.join(partial)} (the map covers part of them, or {missing}); their figures describe "
                     "that part only")
    return lines
