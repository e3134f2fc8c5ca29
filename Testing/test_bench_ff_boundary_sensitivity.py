"""bench/ff_boundary_sensitivity.py: outlines moved in-plane, by the asked displacement in millimetres."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench_script

SENSITIVITY = load_bench_script("ff_boundary_sensitivity")


def stripes(shape: tuple[int, int, int], width: int) -> np.ndarray:
    """Labels 1, 2, 1, 2, ... in bands ``width`` pixels wide along x: boundaries every ``width`` columns."""
    return (1 + (np.arange(shape[2]) // width) % 2).astype(np.uint8)[None, None, :].repeat(shape[0], 0).repeat(shape[1], 1)


def test_no_displacement_gives_the_labels_back():
    labels = stripes((4, 32, 32), 8)
    moved = SENSITIVITY.moved_outlines(labels, (1.0, 1.0, 5.0), 0.0, np.random.default_rng(0))
    assert np.array_equal(moved, labels) and moved is not labels


def test_labels_differing_only_between_slices_are_never_changed():
    labels = np.arange(1, 7, dtype=np.uint8)[:, None, None].repeat(40, 1).repeat(40, 2)  # slice k is label k + 1
    moved = SENSITIVITY.moved_outlines(labels, (1.0, 1.0, 5.0), 2.0, np.random.default_rng(1))
    assert np.array_equal(moved, labels)  # the warp moves voxels within their slice only


def test_boundaries_move_by_the_displacement_in_millimetres_not_pixels():
    # x boundaries only: a row's changed voxels per boundary ≈ |x displacement| in pixels; the x component's SD
    # is rms/√2, so its mean absolute value is rms/√2·√(2/π) = rms/√π millimetres.
    spacing_mm = 0.5
    labels = stripes((8, 512, 96), 16)
    boundaries = 5  # at columns 16, 32, 48, 64, 80
    for rms_mm in (1.0, 2.0):
        shifts_mm = []
        for seed in range(6):  # the field is smooth: one draw holds few independent samples
            moved = SENSITIVITY.moved_outlines(labels, (spacing_mm, spacing_mm, 5.0), rms_mm, np.random.default_rng(seed))
            assert set(np.unique(moved)) <= {1, 2}
            shifts_mm.append((moved != labels).sum() / (labels.shape[0] * labels.shape[1] * boundaries) * spacing_mm)
        assert 0.8 < np.mean(shifts_mm) / (rms_mm / np.sqrt(np.pi)) < 1.2, (rms_mm, shifts_mm)
