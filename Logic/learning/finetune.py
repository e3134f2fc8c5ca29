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
   model's region in every phantom contrast, see
   :func:`dafne_logic.learning.finetune_slices.phantom_replay`).
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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from dafne_logic import __version__
from dafne_logic.core.atomic import atomic_directory
from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.numbers import nanmean
from dafne_logic.core.paths import same_location
from dafne_logic.core.progress import CancelCheck, ProgressCallback
from dafne_logic.inference.manifest import MANIFEST_NAME
from dafne_logic.inference.model_package import PACKAGE_FOLDER, ModelPackage, find_package, weights_bytes
from dafne_logic.inference.networks import resolve_device
from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME, DeltaMetadata, encode_delta, make_delta, weights_norm
from dafne_logic.learning.finetune_loop import agreement_dice, predict_classes, train_on_slices
from dafne_logic.learning.finetune_slices import TrainingSlices, corrected_training_slices, phantom_replay, split_holdout

log = logging.getLogger(__name__)

REPORT_NAME = "finetune_report.json"
TRAINABLE = ("all", "decoder")
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
    holdout_every: int = 5  # every 5th selected image slice (both legs) is held out ...
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
    trainable: str = "all"  # "all" or "decoder": only the U-Net's up-sampling path learns (unet2d only)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.max_steps < 1 or self.prox_mu < 0:
            raise InputError("fine-tuning needs lr > 0, batch size >= 1, max epochs and steps >= 1 and mu >= 0")
        if not 0.0 <= self.resynthesis_probability <= 1.0:
            raise InputError("the resynthesis probability must lie in 0..1")
        if self.trainable not in TRAINABLE:
            raise InputError(f"trainable must be one of {', '.join(TRAINABLE)}, not {self.trainable!r}")


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
            FileExistsError: ``output_dir`` exists and is not a model package folder (an earlier
                output, which is replaced) or an empty folder.
        """
        import json

        output_dir = Path(output_dir)
        parent_path = self.report.get("parent_path")
        if parent_path and same_location(output_dir, parent_path):
            raise InputError(f"{output_dir} is the parent model's folder; choose another output folder")
        with atomic_directory(output_dir, marker=MANIFEST_NAME, what=PACKAGE_FOLDER) as tmp:
            self.model.save(tmp)  # replaces tmp by the package folder
            (tmp / DELTA_NAME).write_bytes(self.delta_bytes())
            (tmp / DELTA_METADATA_NAME).write_text(json.dumps(self.metadata.to_json(), indent=2) + "\n", "utf-8")
            (tmp / REPORT_NAME).write_text(json.dumps(self.report, indent=2) + "\n", "utf-8")
        self.model.path = output_dir
        return output_dir


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
    entry = model.manifest.provenance.get("finetune")
    recorded = (entry.get("server_parent") if isinstance(entry, dict) else None) or {}
    if not isinstance(recorded, dict):  # a hand-edited manifest: treated as a model made before the field
        recorded = {}
    version = str(recorded.get("version") or model.manifest.version.split(LOCAL_MARK, 1)[0])
    found = find_package(model.manifest.name, version, recorded.get("weights_sha256"))
    if found is None:
        log.warning("%s %s descends from version %s, which is not in the model registry: the delta is taken "
                    "against the local parent and cannot be pushed", model.manifest.name, model.manifest.version,
                    version)
        return model, 0
    n_slices = recorded.get("n_slices", 0)
    return found, n_slices if isinstance(n_slices, int) and not isinstance(n_slices, bool) and n_slices >= 0 else 0


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
    train_idx, held_idx = split_holdout(data.sources, config)
    train, held = data.subset(train_idx), data.subset(held_idx) if held_idx else None
    check_cancel()

    device = resolve_device(config.device)
    if config.trainable == "decoder" and model.manifest.architecture.get("name") != "unet2d":
        raise InputError(f"decoder-only fine-tuning needs a unet2d model, not {model.manifest.architecture.get('name')}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        net = model.network("cpu")
        predicted_before = predict_classes(net, data.images, config.batch_size)
        automatic_dice = agreement_dice(predicted_before, data, table)
        net.to(device)
        history, stop_reason, best_state = train_on_slices(net, model.state_dict, table.n_classes, train, held, replay,
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
