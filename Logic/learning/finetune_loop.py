"""The fine-tuning loop and its parts: augmentation, the proximal term, held-out early stopping,
and the agreement Dice between predicted and corrected leg-slices.

Used by :func:`dafne_logic.learning.finetune.finetune_on_corrections`. Tensors: images (B, 1, H, W)
float32, targets (B, H, W) int64 per-leg classes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from dafne_logic.core.labels import LabelTable
from dafne_logic.core.progress import ProgressCallback
from dafne_logic.learning.contrast_resynthesis import resynthesise_contrast
from dafne_logic.learning.evaluation import dice_counts, dice_from_counts
from dafne_logic.learning.finetune_slices import TrainingSlices
from dafne_logic.training.trainer import default_loss

if TYPE_CHECKING:  # the settings type only: finetune imports this module
    from dafne_logic.learning.finetune import FinetuneConfig


def is_unet_decoder(name: str) -> bool:
    """Whether parameter ``name`` of a MONAI ``UNet`` lies on its up-sampling path.

    MONAI nests each level as ``Sequential(down, SkipConnection(inner level), up)``: a parameter
    belongs to the innermost ``model.K`` / ``submodule.K`` that holds it, and K = 2 is an up layer
    (0 a down layer, 1 the skip connection around the deeper levels and the bottleneck).
    """
    tokens = name.split(".")
    indices = [tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i] in ("model", "submodule") and tokens[i + 1].isdigit()]
    return bool(indices) and indices[-1] == "2"


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


def train_on_slices(net: torch.nn.Module, parent_state: dict[str, torch.Tensor], n_classes: int, train: TrainingSlices,
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
    learning = []  # the parameters that learn; the others are frozen (finetune_on_corrections checked the network)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(config.trainable == "all" or is_unet_decoder(name))
        if parameter.requires_grad:
            learning.append(parameter)
    optimizer = torch.optim.Adam(learning, lr=config.lr)
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
