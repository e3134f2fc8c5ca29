"""How sure the network was of each muscle: a per-muscle quality flag for quantitative work.

The confidence of a muscle is the mean, over the pixels the network gave to it (its own grid, slices
with a body), of the margin between the winning class's softmax probability and the runner-up's:
1 where it had no doubt, near 0 where two classes were equally likely. A muscle that swapped
territory with a neighbour, or that is mostly fat and hard to tell from fat, has many doubtful
pixels, so its confidence is low; its fat fraction and volume are then the numbers to check first
(see ``Docs/quantitative.md`` for how well it flags them on phantoms). The same margin averaged
over each slice's muscle pixels points at the slices worth correcting first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dafne_logic.core.labels import LabelTable, Side

# Below this confidence a muscle is marked for review in the statistics. Chosen on development
# phantom Dixon pairs (seeds 200-205, never the benchmark's 100-102): see Docs/quantitative.md.
REVIEW_BELOW = 0.85


@dataclass
class Confidence:
    """What :func:`dafne_logic.inference.segment.segment_with_confidence` says of its own output.

    Attributes:
        per_label: volume label value → mean margin (0..1) over the muscle's pixels.
        per_slice: input slice index k (numpy axis 0 of the input, counted from 0) → mean margin over
            that slice's muscle pixels; empty when the model's axial slices are not the input's
            k slices (a sagittal or coronal acquisition).
    """

    per_label: dict[int, float] = field(default_factory=dict)
    per_slice: dict[int, float] = field(default_factory=dict)

    def least_sure_slices(self, count: int = 3) -> list[int]:
        """The ``count`` slices of lowest confidence, in slice order; none when there are no more
        than ``count`` slices (nothing to choose between)."""
        if len(self.per_slice) <= count:
            return []
        return sorted(sorted(self.per_slice, key=self.per_slice.__getitem__)[:count])


class ConfidenceTally:
    """Sums of the top-two probability margin per volume label and per canonical (axial) slice,
    fed one batch at a time.

    Memory: two numbers per volume label and per slice, whatever the volume.
    """

    def __init__(self, table: LabelTable, slices_with_body: np.ndarray | None,
                 crop_masks: Mapping[Side, np.ndarray] | None = None):
        """``crop_masks``: per side, the (H, W) bool crop pixels that reach the label map
        (:meth:`dafne_logic.core.preprocessing.LegCrop.owned_on_crop`); every pixel when absent."""
        self.table = table
        self.slices_with_body = slices_with_body
        self.crop_masks = dict(crop_masks or {})
        n = 2 * table.n_muscles + 1
        self.sums = np.zeros(n, np.float64)
        self.counts = np.zeros(n, np.int64)
        self.slice_sums: defaultdict[int, float] = defaultdict(float)  # canonical z → margin sum over muscle pixels
        self.slice_counts: defaultdict[int, int] = defaultdict(int)

    def add(self, side: Side, first_slice: int, probabilities: np.ndarray) -> None:
        """One leg's (k, C, H, W) softmax probabilities for crop slices ``first_slice ..``."""
        z = np.arange(first_slice, first_slice + probabilities.shape[0])
        if self.slices_with_body is not None:
            keep = self.slices_with_body[first_slice:first_slice + probabilities.shape[0]]
            probabilities, z = probabilities[keep], z[keep]
        if probabilities.shape[0] == 0:
            return
        import torch  # here, not at the top: the Slicer panel imports this module before torch is installed

        # The winner by max, the runner-up by max over a copy with the winner knocked out: about a
        # third of the time of torch's top-k over the class axis (and a tie still gives margin 0).
        tensor = torch.from_numpy(np.ascontiguousarray(probabilities))
        best, winner = tensor.max(dim=1)  # (k, H, W)
        runner_up = tensor.scatter(1, winner[:, None], -1.0).amax(dim=1)
        margin = (best - runner_up).numpy()
        classes = winner.numpy()
        owned = self.crop_masks.get(side)
        if owned is not None:  # pixels of the other leg or beyond the box: scored where they land, or not at all
            if owned.shape != margin.shape[1:]:
                raise ValueError(f"the {side} crop mask is {owned.shape}, its probabilities {margin.shape[1:]}: "
                                 "give LegCrop.owned_on_crop(), not the box's owned")
            margin, classes = margin[:, owned], classes[:, owned]  # (k, n_owned)
        muscle = classes > 0
        rest = tuple(range(1, margin.ndim))
        for index, total, count in zip(z.tolist(), (margin * muscle).sum(axis=rest).tolist(),
                                       muscle.sum(axis=rest).tolist(), strict=True):
            self.slice_sums[index] += total
            self.slice_counts[index] += count
        volume_values = np.array([0] + [self.table.value_of(i, side) for i in range(1, self.table.n_classes)], np.intp)
        labels = volume_values[classes.ravel()]
        self.sums += np.bincount(labels, weights=margin.ravel(), minlength=self.sums.size)
        self.counts += np.bincount(labels, minlength=self.counts.size)

    def per_label(self) -> dict[int, float]:
        """Mean margin (0..1) per volume label the network predicted anywhere (background left out)."""
        return {v: float(self.sums[v] / self.counts[v]) for v in range(1, self.sums.size) if self.counts[v]}

    def per_canonical_slice(self) -> dict[int, float]:
        """Mean margin (0..1) over the muscle pixels of each canonical slice that has any."""
        return {z: self.slice_sums[z] / n for z, n in sorted(self.slice_counts.items()) if n}


def slices_on_input(per_canonical_slice: Mapping[int, float], to_input_axes: tuple[int, int, int],
                    to_input_flips: tuple[bool, bool, bool], n_slices: int) -> dict[int, float]:
    """Canonical (axial) slice z → the input's slice k, when the input's k axis is the axial one
    (``PreparedVolume.to_input_axes``/``to_input_flips``; ``n_slices`` axial slices); else empty."""
    if to_input_axes[0] != 0:
        return {}
    return {(n_slices - 1 - z) if to_input_flips[0] else z: value for z, value in per_canonical_slice.items()}


def add_confidence_columns(rows: list[dict[str, Any]], confidence: Mapping[int, float]) -> None:
    """Add ``confidence`` (0..1) and ``review`` (True below :data:`REVIEW_BELOW`) to statistics rows
    (:func:`dafne_logic.core.statistics.muscle_statistics`), in place; both None for an absent muscle."""
    for row in rows:
        value = confidence.get(row["label_value"]) if row.get("voxel_count") else None
        row["confidence"] = value
        row["review"] = None if value is None else value < REVIEW_BELOW


def unsure_muscles(confidence: Mapping[int, float], table: LabelTable) -> list[str]:
    """Names of the muscles below :data:`REVIEW_BELOW`, least sure first."""
    names = {label.value: label.name for label in table.volume_labels()}
    return [names[v] for v, c in sorted(confidence.items(), key=lambda item: item[1]) if c < REVIEW_BELOW and v in names]
