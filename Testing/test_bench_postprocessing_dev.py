"""bench/postprocessing_dev.py: the largest-component cut keeps each muscle's largest piece only."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench_script

POST = load_bench_script("postprocessing_dev")


def test_each_label_keeps_its_largest_piece_and_the_rest_is_cleared_or_filled():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[:, 1:4, 1:4] = 1  # muscle 1: a 27-voxel piece
    labels[1, 6, 6] = 1  # and a stray voxel, far away
    labels[:, 1:4, 5:8] = 2  # muscle 2: one piece, touching the stray voxel's neighbourhood
    cut = POST.largest_components(labels, 2, fill=False)
    assert cut[1, 6, 6] == 0 and (cut == 1).sum() == 27 and (cut == 2).sum() == (labels == 2).sum()
    filled = POST.largest_components(labels, 2, fill=True)
    assert filled[1, 6, 6] == 2  # the nearest kept voxel is muscle 2's (row 3, column 6)
    assert (filled[labels == 0] == 0).all()  # background never gains a label
