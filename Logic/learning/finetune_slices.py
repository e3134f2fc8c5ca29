"""What fine-tuning learns from: the user's corrected leg-slices, checked and cropped, a held-out
part for early stopping, and a pool of phantom slices to rehearse against forgetting.

Used by :func:`dafne_logic.learning.finetune.finetune_on_corrections`; images are (N, 1, H, W)
float32 crops normalised as at inference, targets (N, H, W) int64 per-leg classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from dafne_logic.core.errors import InputError
from dafne_logic.core.grids import align_labels_to_image
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.preprocessing import PreparedVolume, fit_to, prepare_volume
from dafne_logic.core.slice_selection import keep_only_slices, min_muscles_required, select_slices
from dafne_logic.inference.model_package import ModelPackage

if TYPE_CHECKING:  # the settings type only: finetune imports this module
    from dafne_logic.learning.finetune import FinetuneConfig


@dataclass


class TrainingSlices:
    """The corrected leg-slices, padded to one size.

    Attributes:
        images: (n, 1, H, W) float32 normalised crops (left legs mirrored).
        targets: (n, H, W) int64 model classes.
        sources: (side, crop slice index) of each sample.
    """

    images: torch.Tensor
    targets: torch.Tensor
    sources: list[tuple[str, int]]

    def subset(self, indices: Sequence[int]) -> TrainingSlices:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TrainingSlices(self.images[idx], self.targets[idx], [self.sources[i] for i in indices])

    def __len__(self) -> int:
        return len(self.sources)


def check_correction(labels: sitk.Image, table: LabelTable) -> None:
    """Refuse an empty correction or label values outside the model's table.

    Raises:
        InputError: all zero, or values outside 0..2N.
    """
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    top = 2 * table.n_muscles
    foreign = [int(v) for v in values if v < 0 or v > top]
    if foreign:
        raise InputError(f"the segmentation holds label values {foreign[:5]} that are not in the model's "
                         f"{table.region} table (1..{top})")
    if not (values > 0).any():
        raise InputError("the segmentation is empty: there is no correction to learn from")


def collect_training_slices(prepared: PreparedVolume, table: LabelTable, min_muscles: int | None) -> TrainingSlices:
    """Every selected leg-slice of a prepared volume, padded (background) to a common size.

    Raises:
        InputError: no slice qualifies.
    """
    images, targets, sources = [], [], []
    for leg in prepared.legs:
        assert leg.target is not None
        for z in select_slices(leg.target, table.n_muscles, min_muscles):
            images.append(leg.image[z])
            targets.append(leg.target[z])
            sources.append((leg.side, z))
    if not sources:
        need = min_muscles or min_muscles_required(table.n_muscles)
        raise InputError(f"no usable slices: no slice of either leg has at least {need} of the "
                         f"{table.n_muscles} {table.region} muscles drawn")
    height = max(a.shape[0] for a in images)
    width = max(a.shape[1] for a in images)

    def pad(array: np.ndarray) -> np.ndarray:
        return np.pad(array, ((0, height - array.shape[0]), (0, width - array.shape[1])))

    return TrainingSlices(
        images=torch.from_numpy(np.stack([pad(a) for a in images]).astype(np.float32))[:, None],
        targets=torch.from_numpy(np.stack([pad(t) for t in targets]).astype(np.int64)),
        sources=sources,
    )


def split_holdout(sources: Sequence[tuple[str, int]], config: FinetuneConfig) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of the leg-slices ``sources`` ((side, slice) each): every
    ``holdout_every``-th image slice is held out, both legs of it, when at least
    ``min_holdout_samples`` leg-slices were selected. Whole image slices, so that no leg-slice is
    judged while the other leg of the same slice (its near mirror image) is trained on."""
    everything = list(range(len(sources)))
    if len(sources) < config.min_holdout_samples:
        return everything, []
    image_slices = sorted({z for _, z in sources})
    held_slices = set(image_slices[config.holdout_every // 2::config.holdout_every])
    held = [i for i, (_, z) in enumerate(sources) if z in held_slices]
    if len(held) == len(sources):
        return everything, []
    return [i for i in everything if i not in set(held)], held


def phantom_replay(model: ModelPackage, config: FinetuneConfig, seed: int, shape: tuple[int, int]) -> TrainingSlices | None:
    """A replay pool: leg-slices of procedural phantoms of the model's region, each anatomy rendered
    in every phantom contrast (the domain the bundled models start from), cropped or padded to
    ``shape`` (H, W).

    Rehearsing them while fine-tuning keeps the model good on the contrasts the correction does
    not show. Returns None for a region without phantoms (a user-defined label table).
    """
    from dafne_logic.core.labels import BUILTIN_TABLES
    from dafne_logic.phantoms.images import CONTRASTS, phantom_tissue_map, render_contrast, to_image

    table = model.labels
    if table.region not in BUILTIN_TABLES or BUILTIN_TABLES[table.region].muscles != table.muscles:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x2E91A7]))
    images, targets = [], []
    for _ in range(config.replay_cases):
        anatomy = phantom_tissue_map(table.region, (config.replay_slices, 432, 432), None, int(rng.integers(1 << 30)))
        labels = to_image(anatomy.muscles, anatomy)
        for contrast in CONTRASTS:
            array = render_contrast(anatomy.tissues, anatomy.muscles, contrast, rng, spacing=anatomy.spacing,
                                    noise=float(rng.uniform(0.0, 0.06)), bias=float(rng.uniform(0.0, 0.3)))
            for leg in prepare_volume(to_image(array, anatomy), model.manifest.preprocessing, labels, table).legs:
                assert leg.target is not None
                images.append(fit_to(leg.image, *shape))
                targets.append(fit_to(leg.target, *shape))
    return TrainingSlices(torch.from_numpy(np.concatenate(images))[:, None],
                          torch.from_numpy(np.concatenate(targets).astype(np.int64)),
                          [("replay", i) for i in range(sum(len(a) for a in images))])


def corrected_training_slices(model: ModelPackage, image: sitk.Image, corrected: sitk.Image,
                              slices: str | Sequence[int], min_muscles: int | None) -> TrainingSlices:
    """The leg-slices to learn from: the correction checked against ``model``'s table, aligned to
    ``image``, restricted to the user's slices (a list of k indices) or chosen automatically
    (``"auto"``: per leg, slices with at least ``min_muscles`` muscles drawn), then cropped per leg.

    Raises:
        InputError: no overlap, label values outside the table, empty correction, no usable slices.
    """
    table = model.labels
    labels = align_labels_to_image(corrected, image)
    check_correction(labels, table)
    listed = not isinstance(slices, str)
    if isinstance(slices, str):
        if slices != "auto":
            raise InputError(f"slices must be 'auto' or a list of slice indices, not {slices!r}")
    else:
        labels = keep_only_slices(labels, list(slices))
        check_correction(labels, table)
        min_muscles = 1 if min_muscles is None else min_muscles
    prepared = prepare_volume(image, model.manifest.preprocessing, labels, table,
                              single_leg_side=drawn_side(labels, table))
    if listed and prepared.to_input_axes[0] != 0:
        # The list names slices along the image's third axis; the model learns from axial slices, each of
        # which would then hold a thin stripe of corrected labels and background everywhere else.
        raise InputError("slice numbers need an axial scan: this image's slices are sagittal or coronal, and the model "
                         "learns from axial slices; correct whole axial slices and let them be chosen automatically "
                         "(slices 'auto').")
    return collect_training_slices(prepared, table, min_muscles)


def drawn_side(labels: sitk.Image, table: LabelTable) -> str | None:
    """The side whose muscles the labels hold when they hold one side only (right values 1..N, left
    N+1..2N), else None. A one-leg scan's side then comes from the correction itself rather than
    from the leg's position, which needs the patient's midline at x = 0."""
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    right = bool(((values >= 1) & (values <= table.n_muscles)).any())
    left = bool((values > table.n_muscles).any())
    return "right" if right and not left else "left" if left and not right else None
