"""New contrasts for the user's own corrected anatomy, drawn while fine-tuning.

A correction shows one contrast (say T1); a model fine-tuned on it learns that contrast's
intensities as well as the anatomy, and can lose ground on other contrasts of other people
(PD, Dixon). Re-painting the corrected slice keeps its anatomy and texture but draws the
intensities anew, in the spirit of SynthSeg (Billot et al. 2023), which the base models are
trained with:

- every muscle gets one random brightness (shared, plus a small per-muscle offset, as muscles
  look alike on most MR contrasts) and keeps the image's own texture around its mean;
- everything else (fat, bone, vessels, skin, air), which the correction does not label, goes
  through a random piecewise-linear intensity curve, which may invert it (fat dark, as on
  fat-suppressed images);
- a light blur hides the hard label edges the painting would otherwise leave for the network
  to cheat on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CURVE_KNOTS = 5  # knots of the random intensity curve of the unlabelled tissues, over [0, 1]
MUSCLE_OFFSET = 0.04  # per-muscle brightness offset, normalised units
EDGE_BLUR_SIGMA_PX = 0.8


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _random_curves(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B, H, W), clamped to [0, 1], through one random piecewise-linear curve per image."""
    b = x.shape[0]
    knots = torch.rand(b, CURVE_KNOTS, generator=generator)
    position = x.clamp(0.0, 1.0).reshape(b, -1) * (CURVE_KNOTS - 1)
    index = position.floor().clamp(max=CURVE_KNOTS - 2).long()
    fraction = position - index
    low, high = knots.gather(1, index), knots.gather(1, index + 1)
    return (low + (high - low) * fraction).reshape(x.shape)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) images, edges replicated."""
    radius = max(1, int(round(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def resynthesise_contrast(images: torch.Tensor, targets: torch.Tensor, n_muscles: int, generator: torch.Generator,
                          probability: float) -> torch.Tensor:
    """Re-paint each image of a batch in a random new contrast with probability ``probability``.

    Args:
        images: (B, 1, H, W) float32, normalised (about 0..1, see :mod:`dafne_logic.core.preprocessing`).
        targets: (B, H, W) int64 classes: 0 background, 1..``n_muscles`` the model's muscles.
        n_muscles: number of muscle classes.
        generator: the only source of randomness (same generator state, same result).
        probability: chance that an image is re-painted; the others are returned unchanged.

    Returns:
        (B, 1, H, W) float32 images on the same grid; ``targets`` still describe them.
    """
    if probability <= 0.0 or images.shape[0] == 0:
        return images
    b = images.shape[0]
    x = images[:, 0]
    muscle = targets > 0
    n_muscle_px = muscle.flatten(1).sum(1).clamp(min=1)
    muscle_mean = (x * muscle).flatten(1).sum(1) / n_muscle_px
    base = _uniform(generator, 0.1, 0.9, b)
    offsets = _uniform(generator, -MUSCLE_OFFSET, MUSCLE_OFFSET, b, n_muscles + 1)
    texture_gain = _uniform(generator, 0.5, 1.5, b)
    painted_muscle = (base[:, None, None] + offsets.gather(1, targets.flatten(1)).reshape(targets.shape)
                      + texture_gain[:, None, None] * (x - muscle_mean[:, None, None]))
    painted = torch.where(muscle, painted_muscle, _random_curves(x, generator))
    painted = _blur(painted[:, None], EDGE_BLUR_SIGMA_PX)
    chosen = torch.rand(b, generator=generator) < probability
    return torch.where(chosen[:, None, None, None], painted, images)
