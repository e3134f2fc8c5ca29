"""Which slices of a case the user changed or approved since the automatic segmentation.

Slices are k indices of the volume (its third voxel axis: the axial slices of an axial scan),
counted from 0, the same indices ``dafne_logic.learning.finetune`` takes. Pure numpy: no MRML, no Qt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def format_slices(slices: Iterable[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"`` (empty -> ``"none"``)."""
    values = sorted(set(slices))
    if not values:
        return "none"
    runs: list[list[int]] = [[values[0], values[0]]]
    for value in values[1:]:
        if value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class ReviewTracker:
    """The automatic labels of one case and the slices the user marked as reviewed.

    A *changed* slice differs from the automatic segmentation (the user edited it); a *reviewed*
    slice was explicitly approved, edited or not. Fine-tuning learns from both.
    """

    automatic: np.ndarray  # (k, j, i) volume labels as the model proposed them
    reviewed: set[int] = field(default_factory=set)

    @property
    def n_slices(self) -> int:
        return int(self.automatic.shape[0])

    def changed_slices(self, current: np.ndarray) -> list[int]:
        """k indices where ``current`` (same shape as the automatic labels) differs from them."""
        if current.shape != self.automatic.shape:
            raise ValueError(f"labels of shape {current.shape} do not match the case's {self.automatic.shape}")
        differs = (current != self.automatic).reshape(self.n_slices, -1).any(axis=1)
        return [int(k) for k in np.flatnonzero(differs)]

    def mark_reviewed(self, slices: Iterable[int], reviewed: bool = True) -> None:
        """Mark (or unmark) slices; indices outside the volume raise ValueError."""
        slices = set(int(k) for k in slices)
        outside = [k for k in slices if not 0 <= k < self.n_slices]
        if outside:
            raise ValueError(f"slices {format_slices(outside)} are outside 0-{self.n_slices - 1}")
        if reviewed:
            self.reviewed |= slices
        else:
            self.reviewed -= slices

    def training_slices(self, current: np.ndarray) -> list[int]:
        """Changed or reviewed slices, sorted: what fine-tuning learns from."""
        return sorted(set(self.changed_slices(current)) | self.reviewed)

    def summary(self, current: np.ndarray) -> str:
        changed = self.changed_slices(current)
        return f"Changed slices: {format_slices(changed)}. Reviewed: {format_slices(self.reviewed)}."
