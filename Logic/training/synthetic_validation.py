"""Dice on synthetic images of held-out anatomy: the trainer's validation and the evaluation's figures."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dafne_logic.training.samplers import AnatomyBank, SynthesisSampler
from dafne_logic.training.synthesis import SynthesisConfig


def dice_by_class(prediction: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes - 1,) Dice of classes 1..N between predicted classes and targets, pooled over the
    batch; pixels whose target is a group code (>= n_classes) are ignored; NaN where a class is in
    neither."""
    known = target < n_classes
    scores = torch.full((n_classes - 1,), float("nan"))
    for c in range(1, n_classes):
        p, t = (prediction == c) & known, target == c
        total = int(p.sum() + t.sum())
        if total:
            scores[c - 1] = 2 * float((p & t).sum()) / total
    return scores


def synthetic_validation(bank: AnatomyBank, config: SynthesisConfig, class_names: list[str], samples: int = 32,
                         seed: int = 12345, regimes: tuple[str, ...] | None = None, batch_size: int = 8,
                         device: str | torch.device = "cpu",
                         percentiles: tuple[float, float] = (0.5, 99.5),
                         unlabelled: frozenset[int] = frozenset()) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A ``validate(network) -> {name: Dice, "mean_dice": ...}`` callable on images synthesised from
    ``bank`` with a fixed seed (the same images at every call). ``class_names`` are the muscles;
    classes in ``unlabelled`` (muscles the sources never label) get NaN and stay out of the mean."""
    from dataclasses import replace

    n_classes = len(class_names) + 1
    sampler = SynthesisSampler(bank, replace(config, regimes=regimes or config.regimes), device, percentiles)
    generator = torch.Generator().manual_seed(seed)
    batches = [sampler(generator, batch_size) for _ in range(max(1, samples // batch_size))]

    def validate(network: torch.nn.Module) -> dict[str, float]:
        predictions = []
        with torch.no_grad():
            for images, _ in batches:
                predictions.append(network(images.to(next(network.parameters()).device)).argmax(1).cpu())
        scores = dice_by_class(torch.cat(predictions), torch.cat([t.cpu() for _, t in batches]), n_classes)
        scores[[c - 1 for c in sorted(unlabelled)]] = float("nan")
        result = {name: float(s) for name, s in zip(class_names, scores, strict=True)}
        valid = scores[~torch.isnan(scores)]
        result["mean_dice"] = float(valid.mean()) if valid.numel() else float("nan")
        return result

    return validate
