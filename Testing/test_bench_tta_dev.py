"""bench/tta_dev.py: each augmentation is undone before its probabilities are averaged."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench_script
from scipy import ndimage

TTA = load_bench_script("tta_dev")


def _echo(slices: np.ndarray) -> np.ndarray:
    """A 'network' whose one-class output is its input: undoing the augmentation must give the input back."""
    return slices[:, None].astype(np.float32)


def _smooth_slices() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ndimage.gaussian_filter(rng.random((2, 64, 64)), (0, 4, 4)).astype(np.float32)


def test_shifts_are_rolled_back_exactly():
    slices = _smooth_slices()
    np.testing.assert_allclose(TTA.shifted(_echo, slices)[:, 0], slices, atol=1e-6)


def test_zoom_and_rotation_are_warped_back_up_to_interpolation():
    slices = _smooth_slices()
    back = TTA.warped(_echo, slices)[:, 0]
    inner = (slice(None), slice(12, -12), slice(12, -12))  # corners rotate out of the field and come back as border
    assert np.abs(back - slices)[inner].max() < 0.1 * slices.std()


def test_an_asymmetric_network_sees_each_warp_and_its_inverse_in_the_right_order():
    """A network that answers 1 on the slice's left half only: warping the input and warping the
    answer back must put that half back on the left, whatever the zoom and rotation."""
    slices = np.zeros((1, 64, 64), np.float32)
    slices[:, :, :32] = 1.0

    def left_half(s: np.ndarray) -> np.ndarray:
        return (s[:, None] > 0.5).astype(np.float32)

    back = TTA.warped(left_half, slices)[0, 0]
    assert back[24:40, 4:24].min() > 0.9 and back[24:40, 40:60].max() < 0.1
