"""Per-muscle, per-side statistics of a segmentation (volume, intensity, maximal cross-sectional area,
optionally fat fraction and parametric maps), and their CSV output."""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.csa import cross_sectional_areas, maximal_areas
from dafne_logic.core.errors import InputError
from dafne_logic.core.grids import same_grid
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.quantitative import DEFAULT_ERODE_MM, QuantitativeMap, quantitative_columns

# CSV columns, in order. Slices are indices along the image's third axis (k, the axial axis of an
# axial acquisition), counted from 0; intensities are in the image's own units.
STAT_FIELDS = (
    "label_value", "name", "muscle", "side", "voxel_count", "volume_ml",
    "mean", "sd", "median", "p5", "p95", "first_slice", "last_slice", "n_slices",
    "max_csa_mm2", "max_csa_position_mm",
)


def muscle_statistics(image: sitk.Image, labels: sitk.Image, table: LabelTable, *,
                      maps: Sequence[QuantitativeMap] = (), erode_mm: float = DEFAULT_ERODE_MM,
                      warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per volume label of ``table`` (right muscles, then left), present or not.

    ``labels`` holds volume labels on the grid of ``image`` (same size, spacing, origin, direction).
    Each row: ``label_value``, ``name``, ``muscle``, ``side``, ``voxel_count``, ``volume_ml``
    (voxel count × voxel volume in mm³ / 1000), intensity ``mean``, ``sd`` (sample SD, n−1),
    ``median``, ``p5``, ``p95`` (linear interpolation between voxel values), ``first_slice`` and
    ``last_slice`` (k index) and ``n_slices`` (number of k slices holding the label). Intensity and
    slice fields are None for an absent label, ``sd`` also for a single voxel. Label values outside
    the table are ignored. ``max_csa_mm2`` is the largest anatomical cross-sectional area on an
    axial slice and ``max_csa_position_mm`` that slice's S position (:mod:`dafne_logic.core.csa`).

    ``maps`` (on the image grid, see :mod:`dafne_logic.core.quantitative`) add ``NAME_mean``,
    ``NAME_median``, ``NAME_sd`` per map (and ``fat_fraction_voxels``), measured inside each muscle
    eroded in-plane by ``erode_mm``; ``warnings``, if given, receives a line per map that leaves
    muscles without a value or covers part of one (:func:`dafne_logic.core.quantitative.cover_warnings`);
    without it those lines are logged.
    """
    if not same_grid(image, labels):
        raise InputError("the segmentation does not lie on the image grid (size, spacing, origin or direction differ).")
    n_labels = 2 * table.n_muscles
    label_voxels = sitk.GetArrayViewFromImage(labels)  # (k, j, i)
    if not np.issubdtype(label_voxels.dtype, np.integer):
        raise InputError(f"the segmentation has pixel type {label_voxels.dtype}; labels must be integers.")
    intensities = sitk.GetArrayViewFromImage(image)

    inside = (label_voxels > 0) & (label_voxels <= n_labels)
    values = label_voxels[inside].astype(np.intp)
    samples = intensities[inside].astype(np.float64)
    counts = np.bincount(values, minlength=n_labels + 1)
    sums = np.bincount(values, weights=samples, minlength=n_labels + 1)
    # Sum of squared deviations from the per-label mean: numerically safer than sum(x²) − n·mean².
    means = np.divide(sums, counts, out=np.full(n_labels + 1, np.nan), where=counts > 0)
    squares = np.bincount(values, weights=(samples - means[values]) ** 2, minlength=n_labels + 1)

    # Group the samples by label (a stable integer sort), so each label's values form one run.
    grouped = samples[np.argsort(values, kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)])

    # Which labels occur on which k slice: one bincount per slice, never one pass per label.
    present = np.zeros((label_voxels.shape[0], n_labels + 1), dtype=bool)
    for k in range(label_voxels.shape[0]):
        slice_values = label_voxels[k][(label_voxels[k] > 0) & (label_voxels[k] <= n_labels)]
        present[k] = np.bincount(slice_values.astype(np.intp), minlength=n_labels + 1) > 0

    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    largest = maximal_areas(cross_sectional_areas(labels, table))
    quantities = quantitative_columns(labels, list(maps), table, erode_mm, warnings)
    rows = []
    for label in table.volume_labels():
        v, n = label.value, int(counts[label.value])
        row: dict[str, Any] = {
            "label_value": v, "name": label.name, "muscle": label.muscle.name, "side": label.side,
            "voxel_count": n, "volume_ml": n * voxel_ml,
            "mean": None, "sd": None, "median": None, "p5": None, "p95": None,
            "first_slice": None, "last_slice": None, "n_slices": 0,
            "max_csa_mm2": None, "max_csa_position_mm": None,
        }
        if n:
            run = grouped[starts[v]:starts[v + 1]]
            p5, median, p95 = np.percentile(run, [5, 50, 95])
            slices = np.flatnonzero(present[:, v])
            row.update(
                mean=float(means[v]), sd=float(np.sqrt(squares[v] / (n - 1))) if n > 1 else None,
                median=float(median), p5=float(p5), p95=float(p95),
                first_slice=int(slices[0]), last_slice=int(slices[-1]), n_slices=int(slices.size),
            )
        row.update(largest.get(v, {}))
        row.update(quantities[v])
        rows.append(row)
    return rows


def statistics_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of :func:`muscle_statistics` rows (header + one line per row; None → empty cell).

    Columns: keys a caller put before the statistics in a row (e.g. ``case`` when several volumes
    share one file), then :data:`STAT_FIELDS` in their order, then the other keys (the map columns)
    in the order they first appear.
    """
    stats = set(STAT_FIELDS)
    leading = [next((i for i, key in enumerate(row) if key in stats), len(row)) for row in rows]
    first = [key for row, n in zip(rows, leading, strict=True) for key in list(row)[:n]]
    fields = list(dict.fromkeys([*first, *STAT_FIELDS, *(key for row in rows for key in row)]))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in fields})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".10g")
    return value


def write_statistics_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write the rows as CSV, atomically."""
    atomic_write_text(path, statistics_csv(rows))
