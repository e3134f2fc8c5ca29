"""Re-painting corrected slices in new contrasts keeps their anatomy and draws new intensities."""

from __future__ import annotations

import pytest
import torch

from dafne_logic.core.errors import InputError
from dafne_logic.learning.contrast_resynthesis import resynthesise_contrast
from dafne_logic.learning.finetune import FinetuneConfig


def t1_like_batch(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Two muscles (classes 1, 2) in bright fat (background) on a dark edge, with texture."""
    g = torch.Generator().manual_seed(3)
    targets = torch.zeros(b, 32, 32, dtype=torch.int64)
    targets[:, 8:24, 4:15] = 1
    targets[:, 8:24, 17:28] = 2
    images = torch.full((b, 1, 32, 32), 0.9)  # fat
    images[:, 0, :2] = 0.0  # air
    images[:, 0][targets > 0] = 0.3  # muscle, dark as on T1
    images = images + 0.02 * torch.randn(images.shape, generator=g)
    return images, targets


def muscle_and_fat(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean intensity per image inside muscle and in the fat well away from it."""
    x = images[:, 0]
    muscle = (x * (targets > 0)).flatten(1).sum(1) / (targets > 0).flatten(1).sum(1)
    fat = x[:, 28:, :].flatten(1).mean(1)
    return muscle, fat


def test_off_returns_the_batch_untouched():
    images, targets = t1_like_batch()
    out = resynthesise_contrast(images, targets, 2, torch.Generator().manual_seed(0), 0.0)
    assert out is images


def test_painted_images_vary_in_contrast_and_keep_the_anatomy():
    images, targets = t1_like_batch(64)
    out = resynthesise_contrast(images, targets, 2, torch.Generator().manual_seed(0), 1.0)
    assert out.shape == images.shape and torch.isfinite(out).all()
    muscle, fat = muscle_and_fat(out, targets)
    # The T1 order (fat brighter than muscle) no longer always holds, and muscle brightness spreads.
    assert 0.15 < (fat > muscle).float().mean() < 0.85
    assert muscle.std() > 0.15
    # Anatomy: inside each muscle the intensity is still nearly uniform compared with the gap to fat.
    x = out[:, 0]
    inside = x[:, 12:20, 6:13].flatten(1).std(1)
    assert (inside < 0.1).all()
    # Texture kept: the painted muscle correlates with the original image's muscle texture.
    original = images[:, 0, 12:20, 6:13].flatten(1)
    painted = x[:, 12:20, 6:13].flatten(1)
    corr = torch.stack([torch.corrcoef(torch.stack([o, p]))[0, 1] for o, p in zip(original, painted)])
    assert corr.mean() > 0.3


def test_same_generator_same_result_and_the_probability_is_honoured():
    images, targets = t1_like_batch(200)
    a = resynthesise_contrast(images, targets, 2, torch.Generator().manual_seed(5), 0.5)
    b = resynthesise_contrast(images, targets, 2, torch.Generator().manual_seed(5), 0.5)
    assert torch.equal(a, b)
    changed = (a != images).flatten(1).any(1).float().mean()
    assert 0.35 < changed < 0.65


def test_the_setting_is_checked():
    with pytest.raises(InputError):
        FinetuneConfig(resynthesis_probability=1.5)
