"""bench/judge_thigh_candidate.py: each condition of the thigh shipping rule can fail the candidate."""

from __future__ import annotations

import copy
import json
import sys

import pytest
from bench_scripts import load_bench_script

JUDGE = load_bench_script("judge_thigh_candidate")
REGIMES = ("t1", "water", "fs_poor", "random")


def _model(dice: float, phantoms: float) -> dict:
    regime = {"vastus lateralis": dice, "gracilis": dice, "adductor longus": float("nan"), "mean_dice": dice}
    held = {r: dict(regime) for r in REGIMES}
    held["subjects"] = ["THIGH_003"]  # not a regime: a list
    held["all regimes"] = dict(regime)
    return {"held_out_thigh_synthetic": held, "phantoms": {"mean_dice": phantoms}}


def _ff(mean: float, worst: float, over_5: int = 4) -> dict:
    return {"errors": {"automatic (water)": {"2": {"mean_abs": mean, "max_abs": worst, "over_5": over_5}}}}


def _verdict(candidate: dict, ff_candidate: dict | None = None, ff_rule: str = "no-rise") -> tuple[bool, str]:
    evaluation = {"shipped": _model(0.85, 0.935), "candidate": candidate}
    ships, lines = JUDGE.judge(evaluation, _ff(2.0, 15.0), ff_candidate or _ff(2.0, 15.0), "shipped", "candidate", ff_rule)
    return ships, "\n".join(lines)


def test_a_candidate_better_everywhere_ships_and_the_target_is_only_reported():
    ships, text = _verdict(_model(0.87, 0.935))
    assert ships and "VERDICT: SHIP" in text
    assert "below in" in text  # 0.87 < 0.90: reported, not a condition


@pytest.mark.parametrize("change, failing", [
    (lambda c: c["phantoms"].update(mean_dice=0.929), "phantoms"),
    (lambda c: c["held_out_thigh_synthetic"]["fs_poor"].update(mean_dice=0.83), "worst regime"),
    (lambda c: c["held_out_thigh_synthetic"]["all regimes"].update(gracilis=0.82), "worst muscle"),
    (lambda c: c["held_out_thigh_synthetic"]["all regimes"].update(mean_dice=0.849), "all-regime mean"),
])
def test_each_dice_condition_fails_the_candidate(change, failing):
    candidate = copy.deepcopy(_model(0.87, 0.935))
    change(candidate)
    ships, text = _verdict(candidate)
    assert not ships
    assert [line for line in text.splitlines() if line.startswith(failing)][0].endswith("FAIL")


def test_a_worse_fat_fraction_error_fails_the_candidate_mean_or_worst():
    assert not _verdict(_model(0.87, 0.935), _ff(2.1, 15.0))[0]
    assert not _verdict(_model(0.87, 0.935), _ff(1.9, 15.5))[0]
    assert _verdict(_model(0.87, 0.935), _ff(1.9, 14.0))[0]


def test_the_over_5_rule_judges_the_count_over_the_target_and_bounds_the_worst():
    better = _model(0.87, 0.935)
    assert _verdict(better, _ff(1.9, 16.5), "over-5")[0]  # worst +1.5, within the 2-point tolerance
    assert not _verdict(better, _ff(1.9, 17.5), "over-5")[0]  # worst +2.5
    assert not _verdict(better, _ff(1.9, 14.0, over_5=5), "over-5")[0]  # one more muscle over 5 points
    assert not _verdict(better, _ff(2.1, 14.0, over_5=3), "over-5")[0]  # mean rose
    assert not _verdict(better, _ff(1.9, 16.5))[0]  # the default rule still refuses any rise of the worst
    with pytest.raises(ValueError, match="unknown fat-fraction rule"):
        _verdict(better, _ff(1.9, 14.0), "lenient")


def test_the_over_5_count_is_taken_at_2_mm_even_from_files_that_only_have_the_review_flag():
    """Older benchmark files count errors over 5 points only in the review flag, at their default erosion."""
    older = {"errors": {"automatic (water)": {"2": {"mean_abs": 1.9, "max_abs": 14.0}}}, "review_flag": {"large": 3},
             "default_erode_mm": 2.0}
    assert JUDGE._over_5(older) == 3
    assert JUDGE._over_5(_ff(1.9, 14.0, over_5=6)) == 6
    with pytest.raises(ValueError, match="at 1.0 mm, not 2 mm"):
        JUDGE._over_5(older | {"default_erode_mm": 1.0})


def test_the_command_line_passes_the_rule_on(tmp_path, capsys, monkeypatch):
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"shipped": _model(0.85, 0.935), "candidate": _model(0.87, 0.935)}))
    (tmp_path / "old.json").write_text(json.dumps(_ff(2.0, 15.0)))
    (tmp_path / "new.json").write_text(json.dumps(_ff(1.9, 16.5)))  # worst +1.5: only the over-5 rule ships it
    for rule, verdict in (("no-rise", "DO NOT SHIP"), ("over-5", "VERDICT: SHIP")):
        monkeypatch.setattr(sys, "argv", ["judge", str(evaluation), str(tmp_path / "old.json"), str(tmp_path / "new.json"),
                                          "--shipped", "shipped", "--ff-rule", rule, "--out", str(tmp_path / f"{rule}.txt")])
        JUDGE.main()
        assert verdict in (tmp_path / f"{rule}.txt").read_text()
