"""Dice overlap between segmentations, per label and averaged.

Both inputs are **volume label maps** (patient-right muscles 1..N, patient-left N+1..2N, see
:mod:`dafne_logic.core.labels`) as ``SimpleITK.Image`` or numpy arrays of the same shape. Results are
keyed by the volume label's name (``"right vastus lateralis"``).

A label absent from both maps has no defined Dice: it is reported as ``NaN`` (so a table of many
cases keeps the same columns) and :func:`mean_dice` skips it. A label present in only one map has
Dice 0.

:func:`evaluate_models` scores many model versions on many cases and :func:`write_dice_csv`
writes the table that :mod:`dafne_logic.learning.learning_curve` reads.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.errors import InputError
from dafne_logic.core.grids import align_labels_to_image, resample_labels, same_grid
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.numbers import nanmean
from dafne_logic.inference.model_package import ModelPackage


def _as_array(image: sitk.Image | np.ndarray, what: str) -> np.ndarray:
    if isinstance(image, sitk.Image):
        return sitk.GetArrayViewFromImage(image)
    if isinstance(image, np.ndarray):
        return image
    raise InputError(f"{what} must be a SimpleITK image or a numpy array, not {type(image).__name__}")


def _check_same_grid(pred: sitk.Image | np.ndarray, ref: sitk.Image | np.ndarray) -> None:
    if isinstance(pred, sitk.Image) and isinstance(ref, sitk.Image) and not same_grid(pred, ref, tolerance=1e-3):
        raise InputError("the prediction and the reference segmentation are on different image grids")


def dice_counts(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label voxel counts for labels 0..n_labels: (intersection, |pred|, |ref|), each shape (n_labels+1,).

    Values above ``n_labels`` are ignored (they are not in the table).
    """
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    p = pred.astype(np.int64, copy=False).ravel()
    r = ref.astype(np.int64, copy=False).ravel()
    bins = n_labels + 1
    p_in = np.where((p >= 0) & (p <= n_labels), p, bins)
    r_in = np.where((r >= 0) & (r <= n_labels), r, bins)
    size_pred = np.bincount(p_in, minlength=bins + 1)[:bins]
    size_ref = np.bincount(r_in, minlength=bins + 1)[:bins]
    inter = np.bincount(p_in[p_in == r_in], minlength=bins + 1)[:bins]
    return inter, size_pred, size_ref


def dice_from_counts(inter: np.ndarray, size_pred: np.ndarray, size_ref: np.ndarray) -> np.ndarray:
    """2|A∩B|/(|A|+|B|) per entry; NaN where both are empty."""
    total = size_pred + size_ref
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), np.nan)


def dice_per_label(pred: sitk.Image | np.ndarray, ref: sitk.Image | np.ndarray, table: LabelTable) -> dict[str, float]:
    """Dice of every volume label of ``table`` (both sides), keyed by name, e.g. ``"left soleus"``.

    Args:
        pred: volume label map (any integer dtype), SimpleITK image or array.
        ref: reference volume label map on the same grid / of the same shape.
        table: label table giving values 1..2N and names.

    Returns:
        ``{name: dice}`` in table order (right side first); ``NaN`` where the label is absent
        from both maps.

    Raises:
        InputError: shapes or image grids differ.
    """
    _check_same_grid(pred, ref)
    labels = table.volume_labels()
    inter, sp, sr = dice_counts(_as_array(pred, "prediction"), _as_array(ref, "reference"), 2 * table.n_muscles)
    dice = dice_from_counts(inter, sp, sr)
    return {lab.name: float(dice[lab.value]) for lab in labels}


def mean_dice(per_label: Mapping[str, float]) -> float:
    """Mean over labels with a defined Dice (NaN entries skipped); NaN when none is defined."""
    return nanmean(per_label.values())


# --- many models on many cases -------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationCase:
    """One dataset to score: an MR volume and its reference segmentation (volume labels)."""

    name: str
    image: sitk.Image
    reference: sitk.Image
    scored: frozenset[int] | None = None  # volume labels the reference names (None: all); the others get NaN


def reference_on_image(reference: sitk.Image, image: sitk.Image, name: str) -> sitk.Image:
    """``reference`` on ``image``'s grid, refused (InputError naming ``name``) when it lies elsewhere in
    space or none of its labels lands on the image: scored as is, it would give Dice 0 to any model."""
    try:
        aligned = align_labels_to_image(reference, image)
    except InputError as exc:
        raise InputError(f"{name}: the reference {str(exc).removeprefix('the segmentation ')}") from None
    if sitk.GetArrayViewFromImage(reference).any() and not sitk.GetArrayViewFromImage(aligned).any():
        raise InputError(f"{name}: none of the reference's labels lies on the image; was it drawn on another volume?")
    return aligned


def evaluate_models(models: Sequence[ModelPackage], cases: Sequence[EvaluationCase], device: str = "auto",
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Segment every case with every model and score it against the reference.

    References on another grid than their image are resampled onto it (nearest neighbour).

    Returns:
        One row per (case, model): ``dataset``, ``model_version``, ``dice`` (mean over labels
        present in the prediction or the reference, among those the reference names: see
        :attr:`EvaluationCase.scored`) and one column per volume-label name.
    """
    from dafne_logic.inference.segment import segment_volume

    rows = []
    for case in cases:
        reference = resample_labels(case.reference, case.image)
        for model in models:
            if progress is not None:
                progress(f"{case.name}: model {model.manifest.name} {model.manifest.version}")
            per_label = dice_per_label(segment_volume(case.image, model, device=device), reference, model.labels)
            if case.scored is not None:  # a muscle the reference never names is not a miss of the model
                per_label.update({label.name: math.nan for label in model.labels.volume_labels()
                                  if label.value not in case.scored})
            rows.append({"dataset": case.name, "model_version": model.manifest.version,
                         "dice": mean_dice(per_label), **per_label})
    return rows


def write_dice_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Rows of :func:`evaluate_models` as CSV (atomic): dataset, model_version, dice, per-label Dice.

    Per-label columns follow first appearance; an undefined Dice is an empty cell.
    """
    columns = ["dataset", "model_version", "dice"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
