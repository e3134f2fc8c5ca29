"""bench/judge_calf_candidate.py: the calf rule as code reproduces session 4's verdict, and each check can fail."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

JUDGE = load_bench_script("judge_calf_candidate")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _saved() -> tuple[dict, dict[str, float]]:
    evaluation = json.loads((RESULTS / "leg_v3_cpu_vs_v2.json").read_text())
    loao = JUDGE.merged_loao([json.loads((RESULTS / "leave_one_anatomy_out_leg-v3-cpu3000.json").read_text())])
    return evaluation, loao


def test_the_saved_calf_version_3_trial_is_refused_for_the_reasons_recorded():
    """Session 4 judged it by hand (bench/results/leg_v3_cpu_shipping_rule.txt): LOAO held, zero-shot and phantoms failed."""
    evaluation, loao = _saved()
    ships, lines = JUDGE.judge(evaluation, loao, "Logic/bundled_models/leg", "/work/runs/leg-v3-cpu", (True, "equal"))
    assert not ships
    verdicts = {line.split(":")[0]: line.endswith("OK") for line in lines if line[0].isdigit()}
    assert verdicts["1. leave-one-anatomy-out t1_example"] and verdicts["1. leave-one-anatomy-out pd_example"]
    assert not verdicts["2. zero-shot t1_example"] and not verdicts["2. zero-shot t1_example, worst label"]
    assert not verdicts["2. zero-shot pd_example"] and verdicts["2. zero-shot pd_example, worst label"]  # -0.0054 mean
    assert not verdicts["3. phantoms"] and verdicts["4. same network"]
    assert any("left extensor digitorum longus" in line and "-0.3432" in line for line in lines)
    assert "below on t1_example" in lines[-2]  # target 0.85: T1 0.764, PD 0.851


def test_a_candidate_equal_to_the_shipped_model_ships_and_each_check_can_refuse_it():
    evaluation, loao = _saved()
    shipped = evaluation["Logic/bundled_models/leg"]
    evaluation = {"shipped": shipped, "candidate": copy.deepcopy(shipped)}
    assert JUDGE.judge(evaluation, loao, "shipped", "candidate", (True, "equal"))[0]
    assert not JUDGE.judge(evaluation, {**loao, "pd_example": 0.79}, "shipped", "candidate", (True, "equal"))[0]
    assert not JUDGE.judge(evaluation, loao, "shipped", "candidate", (False, "architecture differs"))[0]
    worse = copy.deepcopy(evaluation)
    worse["candidate"]["real_calf"]["pd_example"]["left peroneus"] -= 0.06  # one label: mean barely moves
    assert not JUDGE.judge(worse, loao, "shipped", "candidate", (True, "equal"))[0]
    worse = copy.deepcopy(evaluation)
    worse["candidate"]["real_calf"]["t1_example"]["mean_dice"] -= 0.006  # the mean alone, every label held
    assert not JUDGE.judge(worse, loao, "shipped", "candidate", (True, "equal"))[0]
    worse = copy.deepcopy(evaluation)
    worse["candidate"]["phantoms"]["mean_dice"] -= 0.006
    assert not JUDGE.judge(worse, loao, "shipped", "candidate", (True, "equal"))[0]
    with pytest.raises(ValueError, match="more than one"):
        JUDGE.merged_loao([{"slices": {"t1_example": {"mean_dice": 0.8}}}] * 2)
    with pytest.raises(ValueError, match="no leave-one-anatomy-out figure for pd_example"):
        JUDGE.judge(evaluation, {"t1_example": 0.8}, "shipped", "candidate", (True, "equal"))


def test_folds_trained_on_another_schedule_than_the_floor_are_not_compared_with_it():
    """The floor (0.759 / 0.794) is 3,000 CPU steps; a GPU fold of 20,000 steps could pass by length alone."""
    evaluation, loao = _saved()
    report = json.loads((RESULTS / "leave_one_anatomy_out_leg-v3-cpu3000.json").read_text())
    assert JUDGE.merged_schedules([report]) == {"t1_example": (3000, "cpu"), "pd_example": (3000, "cpu")}
    shipped = evaluation["Logic/bundled_models/leg"]
    same = {"shipped": shipped, "candidate": copy.deepcopy(shipped)}
    gpu = {"t1_example": (20000, "cuda"), "pd_example": (3000, "cpu")}
    ships, lines = JUDGE.judge(same, loao, "shipped", "candidate", (True, "equal"), gpu)
    assert not ships and any("t1_example" in line and "not comparable" in line and line.endswith("FAIL") for line in lines)
    assert JUDGE.judge(same, loao, "shipped", "candidate", (True, "equal"), JUDGE.merged_schedules([report]))[0]


def test_the_network_check_reads_the_manifests_and_weights(tmp_path: Path):
    shipped = Path(__file__).resolve().parents[1] / "Logic" / "bundled_models" / "leg"
    same, why = JUDGE.compare_networks(shipped, shipped)
    assert same and "equal" in why
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["architecture"]["kwargs"]["channels"] = [32, 64, 128, 256, 512]
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert JUDGE.compare_networks(shipped, other) == (False, f"no weights file in {other}")
    (other / "weights.safetensors").write_bytes((shipped / "weights.safetensors").read_bytes())
    assert JUDGE.compare_networks(shipped, other) == (False, "architecture differs, weights 3.3 MB (at most 20)")
