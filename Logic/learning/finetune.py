"""Incremental learning: fine-tune a model on one user-corrected volume, producing a child model
and the delta a site may upload.

Steps of :func:`finetune_on_corrections`:

1. Geometry: the corrected labels are resampled (nearest neighbour) onto the image grid when only
   the grid differs; labels that do not overlap the image are refused.
2. Slices: both legs are cropped and the left one mirrored (:mod:`dafne_logic.core.preprocessing`); per
   leg, only slices the user corrected count (default: most muscles drawn, see
   :mod:`dafne_logic.core.slice_selection`; or an explicit list of image k-slices).
3. Agreement: the parent's automatic segmentation of those slices is compared with the correction
   (Dice per volume label): the figure the reference tool sends with each contribution.
4. Training: Adam on Dice + cross-entropy (the trainer's loss), small random affine and intensity
   augmentation, and two guards against forgetting: a FedProx proximal term
   ``mu/2 * ||w - w_parent||^2`` and replay (each batch also rehearses phantom slices of the
   model's region in every phantom contrast, see :func:`phantom_replay`).
   One slice in five is held out (when there are at least five); training stops when its loss
   has not improved for ``patience`` epochs, and the best weights are kept. Without a held-out
   part it stops on a plateau of the training loss. Every random choice comes from ``seed``.
5. Lineage: the child's version is ``"<server version>.local-<8 hex of its weights' sha256>"``;
   its manifest names the parent version and the server version it descends from; the delta
   ``child - server version`` is fp16 + zlib (for a model fine-tuned again locally, the sum of
   its local steps, so it can still be pushed).

This module writes nothing until :meth:`FinetuneResult.save`; cancelling raises
:class:`~dafne_logic.core.errors.Cancelled` with no file touched.

Why not :func:`dafne_logic.training.trainer.train_model`: that trainer streams an endless sampler and
checkpoints to disk; fine-tuning needs a fixed handful of slices held in memory, a penalty on the
live parameters, held-out early stopping with a restore of the best weights, and no file written
before the user accepts the result. It reuses the trainer's loss.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dafne_logic import __version__
from dafne_logic.core.atomic import atomic_directory
from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.grids import align_labels_to_image
from dafne_logic.core.labels import LabelTable
from dafne_logic.core.numbers import nanmean
from dafne_logic.core.preprocessing import PreparedVolume, fit_to, prepare_volume
from dafne_logic.core.progress import CancelCheck, ProgressCallback
from dafne_logic.core.slice_selection import keep_only_slices, min_muscles_required, select_slices
from dafne_logic.inference.model_package import ModelPackage, find_package, weights_bytes
from dafne_logic.inference.networks import resolve_device
from dafne_logic.learning.contrast_resynthesis import resynthesise_contrast
from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME, DeltaMetadata, encode_delta, make_delta, weights_norm
from dafne_logic.learning.evaluation import dice_counts, dice_from_counts
from dafne_logic.training.trainer import default_loss

log = logging.getLogger(__name__)

REPORT_NAME = "finetune_report.json"
LOCAL_MARK = ".local-"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (JSON-serialisable, stored in the provenance)."""

    lr: float = 5e-4  # Adam; half the reference recipe's rate: the parent is already close
    batch_size: int = 4
    max_epochs: int = 12
    max_steps: int = 80  # optimiser steps in all: bounds the time on a 40-slice bilateral thigh
    min_steps_per_epoch: int = 4  # a one-slice correction still gets several augmented steps
    patience: int = 2  # epochs without held-out improvement before stopping
    plateau_tolerance: float = 0.01  # relative training-loss gain that counts as progress (no held-out set)
    holdout_every: int = 5  # every 5th selected slice is held out ...
    min_holdout_samples: int = 5  # ... when at least this many leg-slices were selected
    prox_mu: float = 0.01  # FedProx weight of mu/2 * ||w - w_parent||^2 (parameters summed, not averaged)
    replay_per_batch: int = 4  # synthetic original-domain slices added to each batch (when replay is on)
    replay_cases: int = 1  # phantom anatomies drawn for the replay pool, each in every phantom contrast ...
    replay_slices: int = 2  # ... with this many slices
    rotate_deg: float = 8.0
    scale: float = 0.08  # zoom factor drawn in [1 - scale, 1 + scale]
    translate: float = 0.04  # shift, fraction of the crop size
    intensity_scale: float = 0.1  # gain drawn in [1 - s, 1 + s]
    intensity_shift: float = 0.05  # offset in normalised units
    noise_std: float = 0.02  # Gaussian noise, normalised units
    resynthesis_probability: float = 0.0  # chance a corrected slice is re-painted in a random contrast, per step
    max_seconds: float | None = None  # optional wall-clock budget (makes results time-dependent)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.max_steps < 1 or self.prox_mu < 0:
            raise InputError("fine-tuning needs lr > 0, batch size >= 1, max epochs and steps >= 1 and mu >= 0")
        if not 0.0 <= self.resynthesis_probability <= 1.0:
            raise InputError("the resynthesis probability must lie in 0..1")


@dataclass
class FinetuneResult:
    """A fine-tuned child model, its delta against the parent, and what happened.

    Attributes:
        model: the child package (fp16-rounded weights, not yet saved).
        delta: ``child - parent`` per floating tensor, float16.
        metadata: the JSON that travels with the delta (family, parent version, slice count,
            Dice of the automatic vs the corrected segmentation per volume label).
        report: figures for people: slices used, losses per epoch, stopping reason, Dice on the
            training slices before and after, seconds, delta size.
    """

    model: ModelPackage
    delta: dict[str, torch.Tensor]
    metadata: DeltaMetadata
    report: dict[str, Any] = field(default_factory=dict)

    def delta_bytes(self) -> bytes:
        return encode_delta(self.delta)

    def save(self, output_dir: str | Path) -> Path:
        """Write the package + ``delta.safetensors.zz`` + ``delta.json`` + report, atomically.

        Raises:
            InputError: ``output_dir`` is the parent model's folder (never overwritten).
        """
        import json

        output_dir = Path(output_dir)
        parent_path = self.report.get("parent_path")
        if parent_path and output_dir.resolve() == Path(parent_path).resolve():
            raise InputError(f"{output_dir} is the parent model's folder; choose another output folder")
        with atomic_directory(output_dir) as tmp:
            self.model.save(tmp)  # replaces tmp by the package folder
            (tmp / DELTA_NAME).write_bytes(self.delta_bytes())
            (tmp / DELTA_METADATA_NAME).write_text(json.dumps(self.metadata.to_json(), indent=2) + "\n", "utf-8")
            (tmp / REPORT_NAME).write_text(json.dumps(self.report, indent=2) + "\n", "utf-8")
        self.model.path = output_dir
        return output_dir


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


# --- inputs --------------------------------------------------------------------------------------


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


def split_holdout(n: int, config: FinetuneConfig) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): every ``holdout_every``-th sample when there are enough."""
    if n < config.min_holdout_samples:
        return list(range(n)), []
    held = set(range(config.holdout_every // 2, n, config.holdout_every))
    return [i for i in range(n) if i not in held], sorted(held)


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


# --- augmentation and training -------------------------------------------------------------------


def augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
            config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random small rotation, zoom, shift (same for image and labels) and intensity gain/offset/noise.

    Args:
        images: (B, 1, H, W) float32; targets: (B, H, W) int64.

    Returns:
        Augmented copies of the same shapes; labels are resampled with nearest neighbour.
    """
    b, _, h, w = images.shape

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2.0 - 1.0

    angle = uniform(b) * math.radians(config.rotate_deg)
    zoom = 1.0 + uniform(b) * config.scale
    shift = uniform(b, 2) * 2.0 * config.translate
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # A rotation in pixel space, written in affine_grid's normalised coordinates (x by W/2, y by H/2).
    theta = torch.stack([
        torch.stack([cos, -sin * h / w, shift[:, 0]], dim=1),
        torch.stack([sin * w / h, cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_targets = F.grid_sample(targets[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)[:, 0].round().long()
    gain = 1.0 + uniform(b, 1, 1, 1) * config.intensity_scale
    offset = uniform(b, 1, 1, 1) * config.intensity_shift
    noise = torch.randn(out_images.shape, generator=generator) * config.noise_std
    return out_images * gain + offset + noise, out_targets


def proximal_term(model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``0.5 * sum ||w - w_parent||^2`` over the trainable parameters."""
    squares = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters()]
    return 0.5 * torch.stack(squares).sum()


@torch.no_grad()
def predict_classes(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(n, 1, H, W) → (n, H, W) int64 argmax classes of a network in eval mode."""
    net.eval()
    return torch.cat([net(images[i:i + batch_size]).argmax(1) for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def held_out_loss(net: torch.nn.Module, data: TrainingSlices, loss_fn: Callable, batch_size: int) -> float:
    """The loss over all held-out slices at once (Dice pooled over them), network in eval mode."""
    net.eval()
    logits = torch.cat([net(data.images[i:i + batch_size]) for i in range(0, len(data), batch_size)])
    return float(loss_fn(logits, data.targets))


def agreement_dice(predicted: torch.Tensor, data: TrainingSlices, table: LabelTable) -> dict[str, float]:
    """Dice per volume label (``"right soleus"``) between predicted and target classes of the
    selected leg-slices, pooled over slices; labels absent from both are left out."""
    out: dict[str, float] = {}
    for side in ("right", "left"):
        idx = [i for i, (s, _) in enumerate(data.sources) if s == side]
        if not idx:
            continue
        dice = dice_from_counts(*dice_counts(predicted[idx].numpy(), data.targets[idx].numpy(), table.n_muscles))
        for i, muscle in enumerate(table.muscles, start=1):
            if not math.isnan(dice[i]):
                out[f"{side} {muscle.name}"] = round(float(dice[i]), 6)
    return out


def server_ancestor(model: ModelPackage) -> tuple[ModelPackage, int]:
    """The server (or bundled) version ``model`` descends from, and how many corrected image
    slices its local fine-tunes have used since; ``(model, 0)`` when it is one itself.

    A local model's manifest names its server parent (version and weights sha256); that package is
    looked up in the model registry. When it is not there (deleted, or a model made before the
    field existed), the local model itself is returned with a warning: its delta can be kept but
    not pushed.
    """
    if LOCAL_MARK not in model.manifest.version:
        return model, 0
    recorded = model.manifest.provenance.get("finetune", {}).get("server_parent") or {}
    version = str(recorded.get("version") or model.manifest.version.split(LOCAL_MARK, 1)[0])
    found = find_package(model.manifest.name, version, recorded.get("weights_sha256"))
    if found is None:
        log.warning("%s %s descends from version %s, which is not in the model registry: the delta is taken "
                    "against the local parent and cannot be pushed", model.manifest.name, model.manifest.version,
                    version)
        return model, 0
    return found, int(recorded.get("n_slices", 0))


def _local_version(parent_version: str, weights_sha256: str) -> str:
    base = parent_version.split(LOCAL_MARK, 1)[0]
    return f"{base}{LOCAL_MARK}{weights_sha256[:8]}"


def finetune_on_corrections(
    model: ModelPackage,
    image: sitk.Image,
    corrected: sitk.Image,
    slices: str | Sequence[int] = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    config: FinetuneConfig | None = None,
    min_muscles: int | None = None,
    replay: str | TrainingSlices | None = "phantoms",
) -> FinetuneResult:
    """Fine-tune ``model`` on the slices a user corrected.

    Args:
        model: the parent package (never modified).
        image: the 3D MR volume the correction was drawn on.
        corrected: volume labels (right muscles 1..N, left N+1..2N of ``model.labels``), on the
            image grid or on any grid overlapping it.
        slices: ``"auto"`` (per leg, slices with at least ``min_muscles`` muscles drawn; default
            7 of 12 thigh or 4 of 6 calf muscles), or image k-slice indices the user corrected
            (then any leg with a drawing on a listed slice counts).
        seed: seeds augmentation, batch order and hence the result (same seed, same weights).
        progress: receives (fraction in 0..1, message).
        cancel: polled every step; returning True raises :class:`Cancelled` (nothing is written).
        config: hyper-parameters (default :class:`FinetuneConfig`).
        min_muscles: override the automatic selection threshold.
        replay: slices rehearsed alongside the correction against forgetting: ``"phantoms"``
            (default: :func:`phantom_replay` for the built-in thigh and calf tables, nothing for
            other tables), a prepared :class:`TrainingSlices` pool of the same crop size, or None.

    Returns:
        :class:`FinetuneResult`; call ``.save(folder)`` to write it.

    Raises:
        InputError: no overlap, label values outside the table, empty correction, no usable slices.
        Cancelled: ``cancel`` returned True.
    """
    config = config or FinetuneConfig()
    report_progress = progress or (lambda fraction, message: None)
    began = time.monotonic()
    table = model.labels

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled("fine-tuning cancelled; no model was written")

    report_progress(0.0, "preparing the corrected slices")
    data = corrected_training_slices(model, image, corrected, slices, min_muscles)
    replay = _replay_pool(replay, model, config, seed, tuple(data.images.shape[2:]), report_progress)
    train_idx, held_idx = split_holdout(len(data), config)
    train, held = data.subset(train_idx), data.subset(held_idx) if held_idx else None
    check_cancel()

    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = model.network("cpu")
        predicted_before = predict_classes(net, data.images, config.batch_size)
        automatic_dice = agreement_dice(predicted_before, data, table)
        net.to(device)
        history, stop_reason, best_state = _train(net, model.state_dict, table.n_classes, train, held, replay,
                                                  generator, config, device, report_progress, check_cancel, began)
    net.load_state_dict(best_state)
    net.to("cpu")
    predicted_after = predict_classes(net, data.images, config.batch_size)
    after_dice = agreement_dice(predicted_after, data, table)
    # The held-out slices steered only early stopping, never the gradients: their Dice is the
    # honest one (the trained slices' Dice after fine-tuning mostly shows memorisation).
    held_before = agreement_dice(predicted_before[held_idx], held, table) if held is not None else None
    held_after = agreement_dice(predicted_after[held_idx], held, table) if held is not None else None

    child_state = {k: v.detach().to(torch.float16).float() for k, v in best_state.items()}
    n_image_slices = len({z for _, z in data.sources})
    training = {
        "parent_version": model.manifest.version,
        "n_slices": n_image_slices,
        "n_leg_slices": len(data),
        "n_replay_slices": len(replay) if replay is not None else 0,
        "seed": seed,
        "config": asdict(config),
        "stop_reason": stop_reason,
        "epochs": len(history) - 1,
    }
    # The delta always goes against the server version the model descends from, so a model
    # fine-tuned again locally can still be pushed (as the sum of its local steps).
    base, earlier_slices = server_ancestor(model)
    base_dice = automatic_dice
    if base is not model:
        base_dice = agreement_dice(predict_classes(base.network("cpu"), data.images, config.batch_size), data, table)
    n_slices_since_base = earlier_slices + n_image_slices
    child = _child_package(model, child_state, training, base, n_slices_since_base)
    delta = make_delta(base.state_dict, child_state)
    metadata = DeltaMetadata(family=child.manifest.name, parent_version=base.manifest.version,
                             n_slices=n_slices_since_base, dice_per_label=base_dice,
                             client_version=__version__, parent_sha256=base.manifest.weights_sha256)
    report = {
        "parent_version": model.manifest.version,
        "parent_path": str(model.path) if model.path else None,
        "version": child.manifest.version,
        "n_slices": n_image_slices,
        "n_leg_slices": len(data),
        "n_held_out": len(held_idx),
        "n_replay_slices": training["n_replay_slices"],
        "leg_slices": [[side, z] for side, z in data.sources],
        "epochs": len(history) - 1,
        "stop_reason": stop_reason,
        "history": history,
        "dice_before": automatic_dice,
        "dice_after": after_dice,
        "mean_dice_before": nanmean(automatic_dice.values()),
        "mean_dice_after": nanmean(after_dice.values()),
        "dice_held_out_before": held_before,
        "dice_held_out_after": held_after,
        "mean_dice_held_out_before": nanmean(held_before.values()) if held_before is not None else None,
        "mean_dice_held_out_after": nanmean(held_after.values()) if held_after is not None else None,
        "delta_parent_version": base.manifest.version,
        "delta_norm": weights_norm(delta),
        "delta_megabytes": len(encode_delta(delta)) / 1e6,
        "seconds": time.monotonic() - began,
    }
    report_progress(1.0, f"fine-tuned on {len(data)} leg-slices; Dice on them "
                         f"{report['mean_dice_before']:.3f} -> {report['mean_dice_after']:.3f}")
    return FinetuneResult(child, delta, metadata, report)


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
    if isinstance(slices, str):
        if slices != "auto":
            raise InputError(f"slices must be 'auto' or a list of slice indices, not {slices!r}")
    else:
        labels = keep_only_slices(labels, list(slices))
        check_correction(labels, table)
        min_muscles = 1 if min_muscles is None else min_muscles
    prepared = prepare_volume(image, model.manifest.preprocessing, labels, table)
    return collect_training_slices(prepared, table, min_muscles)


def _replay_pool(replay: str | TrainingSlices | None, model: ModelPackage, config: FinetuneConfig, seed: int,
                 shape: tuple[int, ...], report_progress: ProgressCallback) -> TrainingSlices | None:
    """The rehearsal pool ``finetune_on_corrections``'s ``replay`` argument names (crops of ``shape``)."""
    if not isinstance(replay, str):
        return replay
    if replay != "phantoms":
        raise InputError(f"replay must be 'phantoms', a TrainingSlices pool or None, not {replay!r}")
    if not config.replay_per_batch:
        return None
    report_progress(0.02, "drawing replay phantoms")
    return phantom_replay(model, config, seed, (shape[0], shape[1]))


def _child_package(model: ModelPackage, child_state: dict[str, torch.Tensor], training: dict[str, Any],
                   base: ModelPackage, n_slices_since_base: int) -> ModelPackage:
    """The fine-tuned package: ``model``'s manifest with a local version named by the new weights'
    hash, ``model`` as parent, and provenance naming the server version its delta is taken against."""
    sha = hashlib.sha256(weights_bytes(child_state)).hexdigest()
    manifest = copy.deepcopy(model.manifest)
    manifest.version = _local_version(model.manifest.version, sha)
    manifest.parent_version = model.manifest.version
    manifest.created = ""
    manifest.provenance = {
        "trained_on": model.manifest.provenance.get("trained_on", "unknown"),
        "finetune": {**training, "server_parent": {
            "version": base.manifest.version, "weights_sha256": base.manifest.weights_sha256,
            "n_slices": n_slices_since_base}},
    }
    return ModelPackage(manifest, child_state)


def _train(net: torch.nn.Module, parent_state: dict[str, torch.Tensor], n_classes: int, train: TrainingSlices,
           held: TrainingSlices | None, replay: TrainingSlices | None, generator: torch.Generator, config: FinetuneConfig,
           device: torch.device, report_progress: ProgressCallback, check_cancel: Callable[[], None],
           began: float) -> tuple[list[dict[str, float | None]], str, dict[str, torch.Tensor]]:
    """The fine-tuning loop; returns (per-epoch history, stop reason, kept weights on CPU).

    With a held-out set the weights of its lowest loss are kept (epoch 0 = the parent); without
    one the latest weights are kept and a training-loss gain under ``plateau_tolerance`` counts
    as no progress.
    """
    loss_fn = default_loss(n_classes)
    anchor = {name: parent_state[name].to(device) for name, _ in net.named_parameters()}
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    steps_per_epoch = max(config.min_steps_per_epoch, math.ceil(len(train) / config.batch_size))
    total_steps = min(config.max_steps, steps_per_epoch * config.max_epochs)
    if held is not None:
        held = TrainingSlices(held.images.to(device), held.targets.to(device), held.sources)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}

    best = held_out_loss(net, held, loss_fn, config.batch_size) if held is not None else math.inf
    history: list[dict[str, float | None]] = [
        {"epoch": 0, "train_loss": None, "held_out_loss": best if held is not None else None}]
    kept, stale = snapshot(), 0
    stop_reason = f"reached {config.max_epochs} epochs"
    order: list[int] = []
    step = 0
    for epoch in range(1, config.max_epochs + 1):
        net.train()
        losses = []
        for _ in range(min(steps_per_epoch, total_steps - step)):
            check_cancel()
            while len(order) < config.batch_size:  # reshuffle each pass; tiny sets repeat within a batch
                order += torch.randperm(len(train), generator=generator).tolist()
            batch, order = order[:config.batch_size], order[config.batch_size:]
            images, targets = train.images[batch], train.targets[batch]
            images = resynthesise_contrast(images, targets, n_classes - 1, generator, config.resynthesis_probability)
            if replay is not None and config.replay_per_batch > 0:
                pick = torch.randint(len(replay), (config.replay_per_batch,), generator=generator)
                images = torch.cat([images, replay.images[pick]])
                targets = torch.cat([targets, replay.targets[pick]])
            images, targets = augment(images, targets, generator, config)
            data_loss = loss_fn(net(images.to(device)), targets.to(device))
            loss = data_loss + config.prox_mu * proximal_term(net, anchor) if config.prox_mu > 0 else data_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(data_loss.detach()))
            step += 1
            report_progress(0.05 + 0.9 * step / total_steps, f"epoch {epoch}, step {step}: loss {losses[-1]:.3f}")
        train_loss = float(np.mean(losses))
        if held is not None:
            current = held_out_loss(net, held, loss_fn, config.batch_size)
            improved = current < best
        else:
            current = train_loss
            improved = current < best * (1.0 - config.plateau_tolerance)
        history.append({"epoch": epoch, "train_loss": train_loss,
                        "held_out_loss": current if held is not None else None})
        if improved:
            best, stale = current, 0
        else:
            stale += 1
        if improved or held is None:
            kept = snapshot()
        if stale >= config.patience:
            stop_reason = (f"held-out loss did not improve for {config.patience} epochs" if held is not None
                           else f"training loss plateaued for {config.patience} epochs")
            break
        if step >= total_steps:
            stop_reason = f"reached {total_steps} steps"
            break
        if config.max_seconds is not None and time.monotonic() - began > config.max_seconds:
            stop_reason = f"time budget of {config.max_seconds:.0f} s reached"
            break
    return history, stop_reason, kept
