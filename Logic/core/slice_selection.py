"""Which corrected slices fine-tuning may learn from.

A user rarely corrects every slice of a volume. Training on a slice where only a few muscles are
drawn would teach the network that the undrawn muscles are background, so by default only slices
where *most* of the model's muscles are drawn count as corrected, per leg. The reference tool
(Dafne) required 7 of its 12 thigh muscles or 4 of its 6 calf muscles; :func:`min_muscles_required`
keeps that fraction (7/12, rounded up) for any label table.

Slices are chosen per leg on the model-class targets of :mod:`dafne_logic.core.preprocessing`
(``(n_slices, H, W)`` arrays, 0 = background, 1..N = muscles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from dafne_logic.core.errors import InputError

REFERENCE_FRACTION = 7 / 12  # Dafne: 7 of 12 thigh muscles (and 4 of 6 calf muscles, rounded up)


def min_muscles_required(n_muscles: int) -> int:
    """Muscles that must be drawn on a leg's slice for automatic selection: ceil(7/12 * N)."""
    return max(1, math.ceil(REFERENCE_FRACTION * n_muscles - 1e-9))


def muscles_per_slice(target: np.ndarray, n_muscles: int) -> np.ndarray:
    """Number of distinct muscles (classes 1..N) present on each slice of a (n_slices, H, W) target."""
    present = np.zeros((target.shape[0], n_muscles + 1), dtype=bool)
    for z in range(target.shape[0]):
        values = np.unique(target[z])
        present[z, values[(values >= 1) & (values <= n_muscles)]] = True
    return present[:, 1:].sum(axis=1)


def select_slices(target: np.ndarray, n_muscles: int, min_muscles: int | None = None) -> list[int]:
    """Indices of the slices of one leg with at least ``min_muscles`` muscles drawn.

    Args:
        target: (n_slices, H, W) model classes of one leg.
        n_muscles: N of the label table.
        min_muscles: threshold; default :func:`min_muscles_required` (7 of 12, 4 of 6). Pass 1 to
            keep every slice with any drawing (used when the user lists the slices explicitly).
    """
    threshold = min_muscles_required(n_muscles) if min_muscles is None else min_muscles
    return [int(z) for z in np.flatnonzero(muscles_per_slice(target, n_muscles) >= threshold)]


def parse_slice_list(text: str) -> list[int] | str:
    """``"auto"`` or a list like ``"3,5,10-14"`` (0-based, ranges inclusive) → ``"auto"`` or sorted ints.

    Raises:
        InputError: anything else.
    """
    text = text.strip()
    if text.lower() == "auto":
        return "auto"
    out: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                first, last = part.split("-", 1)
                lo, hi = int(first), int(last)
                if hi < lo:
                    raise ValueError(part)
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError as exc:
        raise InputError(f"slices must be 'auto' or a list like '3,5,10-14', not {text!r}") from exc
    if not out or min(out) < 0:
        raise InputError(f"slices must be 'auto' or non-negative indices like '3,5,10-14', not {text!r}")
    return sorted(out)


def keep_only_slices(labels: sitk.Image, slices: Sequence[int]) -> sitk.Image:
    """Copy of a label image with every voxel outside the listed k-slices set to 0.

    ``slices`` index the image's third axis (k: the slice number shown by viewers for an axial
    acquisition). Clearing the other slices before preprocessing lets the user's choice survive
    any reorientation the preprocessing applies.

    Raises:
        InputError: an index outside the image.
    """
    depth = labels.GetSize()[2]
    bad = [z for z in slices if not 0 <= z < depth]
    if bad:
        raise InputError(f"slice index {bad[0]} is outside the segmentation's {depth} slices (0..{depth - 1})")
    array = sitk.GetArrayFromImage(labels)
    keep = np.zeros(depth, dtype=bool)
    keep[list(slices)] = True
    array[~keep] = 0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out
