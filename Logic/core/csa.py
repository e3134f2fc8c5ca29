"""Anatomical cross-sectional area (ACSA) of each muscle along the leg, slice by slice.

Areas are measured on axial slices: a label map in another orientation is first permuted and
flipped onto axial slices (``sitk.DICOMOrient`` to LPS, exact, no interpolation; an oblique
acquisition takes its nearest axial orientation). A slice's position is the S (superior)
coordinate of its centre in mm, in the scanner's patient coordinates (LPS z, the same number as
RAS S in Slicer).
"""

from __future__ import annotations

import csv
import io as _io
import os
from typing import Any

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.labels import LabelTable

CSA_FIELDS = ("label_value", "name", "muscle", "side", "slice", "position_mm", "area_mm2")


def cross_sectional_areas(labels: sitk.Image, table: LabelTable) -> list[dict[str, Any]]:
    """One row per volume label and axial slice that holds it, right muscles first, slices upward.

    Row: ``label_value``, ``name``, ``muscle``, ``side``, ``slice`` (index of the axial slice, 0 =
    most inferior), ``position_mm`` (S coordinate of the slice centre), ``area_mm2`` (voxel count on
    the slice × in-plane voxel area).
    """
    axial = sitk.DICOMOrient(labels, "LPS")
    voxels = sitk.GetArrayViewFromImage(axial)  # (k = inferior → superior, j, i)
    n_labels = 2 * table.n_muscles
    counts = np.stack([np.bincount(np.clip(plane.ravel(), 0, n_labels + 1).astype(np.intp), minlength=n_labels + 2)
                       for plane in voxels])[:, :n_labels + 1]  # (slices, labels); values above the table dropped
    spacing = axial.GetSpacing()
    pixel_mm2 = spacing[0] * spacing[1]
    size = axial.GetSize()
    centre_ij = ((size[0] - 1) / 2.0, (size[1] - 1) / 2.0)
    positions = [axial.TransformContinuousIndexToPhysicalPoint((*centre_ij, float(k)))[2] for k in range(size[2])]
    rows = []
    for label in table.volume_labels():
        for k in np.flatnonzero(counts[:, label.value]):
            rows.append({
                "label_value": label.value, "name": label.name, "muscle": label.muscle.name, "side": label.side,
                "slice": int(k), "position_mm": float(positions[k]), "area_mm2": float(counts[k, label.value] * pixel_mm2),
            })
    return rows


def maximal_areas(csa_rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per label value present, the largest area (``max_csa_mm2``) and its slice position (``max_csa_position_mm``)."""
    best: dict[int, dict[str, float]] = {}
    for row in csa_rows:
        current = best.get(row["label_value"])
        if current is None or row["area_mm2"] > current["max_csa_mm2"]:
            best[row["label_value"]] = {"max_csa_mm2": row["area_mm2"], "max_csa_position_mm": row["position_mm"]}
    return best


def csa_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of :func:`cross_sectional_areas` rows; caller-added keys (e.g. ``case``) come first."""
    fields = list(dict.fromkeys([*(k for row in rows for k in row if k not in CSA_FIELDS), *CSA_FIELDS]))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format(v, ".10g") if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def write_csa_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write the rows as CSV, atomically."""
    atomic_write_text(path, csa_csv(rows))
