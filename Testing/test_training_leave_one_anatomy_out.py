"""bench/leave_one_anatomy_out.py: the scored slice's own label map never reaches its training."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_scripts import load_bench_script


def load_bench():
    return load_bench_script("leave_one_anatomy_out")


def test_each_real_slice_is_trained_without_its_own_label_map(tmp_path: Path):
    bench = load_bench()
    (tmp_path / "visible_human_label_maps").mkdir()
    (tmp_path / "visible_human_label_maps" / "VHM_legs_labels.nii.gz").write_bytes(b"")
    for held_out, other in (("t1_example", "pd_example"), ("pd_example", "t1_example")):
        sources = [p.name for p in bench.anatomy_sources(tmp_path, held_out)]
        assert f"{held_out}_labels.nii.gz" not in sources and f"{other}_labels.nii.gz" in sources
        assert "visible_human_label_maps" in sources and "test_dseg_a.nii.gz" in sources
    args = argparse.Namespace(data=tmp_path, steps=7, batch_size=4, lr=0.002, seed=0, device="cpu", phantoms=9,
                              phantom_share=0.3, source_weights=["VHM_legs=0.6", "nothing_like_it=2"], time_limit=None)
    command = bench.train_command(args, "t1_example", tmp_path / "out")
    assert command[:3] == ["train", "--region", "leg"] and "--init" not in command  # from random weights
    assert str(tmp_path / "calf_slices" / "t1_example_labels.nii.gz") not in command
    assert command[command.index("--steps") + 1] == "7" and "phantom_1008" in command
    # Weights for the label maps that are there (inside the folder too), none for absent ones.
    assert command[command.index("--source-weights"):] == ["--source-weights", "VHM_legs=0.6"]
    assert "--time-limit" not in command
    args.time_limit = 6.5  # minutes per held-out slice, forwarded to the training
    timed = bench.train_command(args, "t1_example", tmp_path / "out")
    assert timed[timed.index("--time-limit") + 1] == "6.5"
