"""Merge rules as pure functions: no HTTP, no database."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dafne_logic.learning.delta import weights_norm
from dafne_server.merging import (
    Decision,
    MergeSettings,
    Update,
    accept_candidate,
    apply_merged,
    clip_delta,
    coordinate_median,
    lowest_scoring,
    merge_updates,
    staleness_weight,
    trimmed_mean,
    worst_contributor,
)


def _delta(value: float, shape=(4,)) -> dict[str, torch.Tensor]:
    return {"w": torch.full(shape, value), "b": torch.full((2,), value)}


def test_staleness_weight_follows_inverse_square_root():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_single_update_is_fedasync_scaled_by_staleness():
    result = merge_updates([Update("a", _delta(2.0), staleness=3, n_slices=10)], MergeSettings(buffer_size=1))
    assert result.rule == "fedasync"
    assert torch.allclose(result.delta["w"], torch.full((4,), 1.0))  # 2 · (1+3)^-½


def test_two_updates_count_the_same_and_the_smaller_norm_bounds_both():
    # Case counts are claimed by clients: with two updates neither outweighs the other, and the
    # larger delta is clipped to the smaller one's norm (the lower median of two).
    updates = [Update("a", _delta(1.0), 0, n_slices=30), Update("b", _delta(4.0), 0, n_slices=10)]
    result = merge_updates(updates, MergeSettings())
    assert result.rule == "mean"
    assert result.weights == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert result.clip_bound == pytest.approx(weights_norm(_delta(1.0)))
    assert torch.allclose(result.delta["w"], torch.full((4,), 1.0))


def test_k2_attacker_claiming_100000_slices_is_bounded_and_reported_overridden():
    honest = Update("honest", _delta(0.01), 0, n_slices=12)
    attacker = Update("attacker", _delta(-5.0), 0, n_slices=100_000)
    result = merge_updates([honest, attacker], MergeSettings(buffer_size=2))
    assert result.weights["attacker"] == pytest.approx(0.5)  # not 200/212 of the merge
    assert weights_norm({k: v * 0.5 for k, v in attacker.delta.items()}) > 100 * weights_norm(result.delta)
    assert set(result.overridden) == {"attacker"}
    assert "100000 claimed slices counted as 12" in result.overridden["attacker"]
    assert "clipped" in result.overridden["attacker"]


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_robust_location_reports_the_update_it_left_out(rule):
    # Equal norms (no clipping) and equal counts: only the location rule can override the outlier.
    g = torch.Generator().manual_seed(0)
    honest = [1.0 + 0.1 * torch.randn(200, generator=g) for _ in range(4)]  # site noise per coordinate
    updates = [Update(f"u{i}", {"w": w}, 0, 10) for i, w in enumerate([*honest, torch.full((200,), -1.0)])]
    result = merge_updates(updates, MergeSettings(robust_rule=rule, clip_norm=1e9))
    assert set(result.overridden) == {"u4"} and "left out at 100%" in result.overridden["u4"]


def test_lowest_scoring_candidate_counts_undefined_dice_lowest():
    decisions = {"a": Decision(False, "", 0.7, 0.8), "b": Decision(False, "", 0.6, 0.8)}
    assert lowest_scoring(decisions) == "b"
    assert lowest_scoring({**decisions, "c": Decision(False, "", math.nan, 0.8)}) == "c"


def test_case_weight_is_capped():
    updates = [Update("a", _delta(1.0), 0, n_slices=10_000), Update("b", _delta(0.0), 0, n_slices=100)]
    result = merge_updates(updates, MergeSettings(max_case_weight=100))
    assert result.weights["a"] == pytest.approx(0.5)


def test_clip_delta_bounds_the_norm_and_keeps_direction():
    d = _delta(3.0)
    clipped = clip_delta(d, 1.0)
    assert weights_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(clipped["w"] / clipped["w"].norm(), d["w"] / d["w"].norm())
    assert clip_delta(d, 100.0) is d


def test_median_and_trimmed_mean_ignore_one_extreme_value():
    deltas = [_delta(v) for v in (1.0, 1.1, 0.9, 1.0, 1000.0)]
    w = torch.full((5,), 0.2)
    assert torch.allclose(coordinate_median(deltas, w)["w"], torch.full((4,), 1.0))
    assert torch.allclose(trimmed_mean(deltas, w, 0.2)["w"], torch.full((4,), (1.0 + 1.0 + 1.1) / 3))


def test_weighted_median_follows_the_weights():
    deltas = [_delta(v) for v in (0.0, 1.0, 2.0)]
    assert torch.allclose(coordinate_median(deltas, torch.tensor([0.1, 0.1, 0.8]))["w"], torch.full((4,), 2.0))
    assert torch.allclose(coordinate_median(deltas, torch.tensor([0.6, 0.2, 0.2]))["w"], torch.full((4,), 0.0))


def test_three_or_more_updates_use_robust_rule_and_median_clip():
    updates = [Update(str(i), _delta(v), 0, 10) for i, v in enumerate((1.0, 1.0, 1.0, 50.0))]
    result = merge_updates(updates, MergeSettings(robust_rule="median"))
    assert result.rule == "median"
    assert result.clip_bound == pytest.approx(weights_norm(_delta(1.0)))
    assert torch.allclose(result.delta["w"], torch.full((4,), 1.0))
    assert worst_contributor(updates, result.delta) == "3"


def test_incompatible_updates_are_refused():
    with pytest.raises(ValueError):
        merge_updates([Update("a", _delta(1.0), 0, 1), Update("b", _delta(1.0, (5,)), 0, 1)], MergeSettings())


def test_apply_merged_adds_scaled_delta_and_copies_the_rest():
    active = {"w": torch.zeros(4), "b": torch.ones(2), "step": torch.tensor([3])}
    out = apply_merged(active, _delta(1.0), server_lr=0.5)
    assert torch.allclose(out["w"], torch.full((4,), 0.5))
    assert torch.equal(out["step"], torch.tensor([3]))


def test_acceptance_gate_mean_and_per_label():
    active = {"a": 0.80, "b": 0.70, "c": math.nan}
    assert accept_candidate({"a": 0.81, "b": 0.70, "c": math.nan}, active, 0.005, 0.02).accepted
    assert accept_candidate({"a": 0.80, "b": 0.692, "c": math.nan}, active, 0.005, 0.02).accepted
    low_mean = accept_candidate({"a": 0.78, "b": 0.70}, active, 0.005, 0.05)
    assert not low_mean.accepted and "mean Dice" in low_mean.reason
    label_drop = accept_candidate({"a": 0.90, "b": 0.67}, active, 0.005, 0.02)
    assert not label_drop.accepted and "b drops" in label_drop.reason
    assert not accept_candidate({"a": math.nan}, active, 0.005, 0.02).accepted


def test_the_gate_compares_means_over_the_labels_both_models_have():
    """A label no reference holds: the active model predicts it (Dice 0), the candidate does not (NaN).
    Over each model's own labels the candidate's mean would rise though every shared label fell."""
    active = {name: 0.9 for name in "abcde"} | {"f": 0.0}
    candidate = {name: 0.885 for name in "abcde"} | {"f": math.nan}
    decision = accept_candidate(candidate, active, 0.005, 0.02)
    assert not decision.accepted and "mean Dice 0.8850" in decision.reason and "0.9000" in decision.reason


def test_one_update_is_never_overridden_by_its_slice_count():
    """FedAsync (one update): the count weighs nothing, so a claim over the cap is not cut."""
    result = merge_updates([Update("a", _delta(1.0), staleness=0, n_slices=500)], MergeSettings(buffer_size=1))
    assert result.overridden == {}


def test_tied_values_leave_no_update_out():
    """Coordinates where every update agrees (unchanged parameters) say nothing about who was left out."""
    # Where they differ, each update is the middle value once: none is left out more than another.
    differing = [(0.1, 0.2, 0.3), (0.2, 0.3, 0.1), (0.3, 0.1, 0.2)]
    deltas = [{"w": torch.cat([torch.zeros(1000), torch.tensor([c[i] for c in differing])])} for i in range(3)]
    for rule in ("median", "trimmed_mean"):
        result = merge_updates([Update(k, d, staleness=0, n_slices=10) for k, d in zip("abc", deltas, strict=True)],
                               MergeSettings(buffer_size=3, robust_rule=rule, clip_norm=10.0))
        assert result.overridden == {}, (rule, result.overridden)


def test_settings_round_trip_and_validation():
    s = MergeSettings(buffer_size=5, robust_rule="median")
    assert MergeSettings.from_json(s.to_json()) == s
    with pytest.raises(ValueError):
        MergeSettings(buffer_size=0)
    with pytest.raises(ValueError):
        MergeSettings(robust_rule="max")


# --- one poisoned client among five, on a tiny synthetic segmentation task --------------------


def _make_data(seed: int, n: int = 24, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n,1,H,W) of two noisy intensity classes in random rectangles; targets (n,H,W) in {0,1,2}."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for cls in (1, 2):
            y, x = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(5, 9, (2,), generator=g).tolist()
            target[i, y:y + h, x:x + w] = cls
    image = target.float() + 0.6 * torch.randn(n, size, size, generator=g)
    return image.unsqueeze(1), target


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))


def _train(net: nn.Module, data, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    image, target = data
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(image), target).backward()
        opt.step()


def _mean_dice(state: dict[str, torch.Tensor], data) -> float:
    net = _net()
    net.load_state_dict(state)
    image, target = data
    with torch.no_grad():
        pred = net(image).argmax(1)
    dice = [2 * ((pred == c) & (target == c)).sum() / ((pred == c).sum() + (target == c).sum()) for c in (1, 2)]
    return float(sum(dice) / 2)


def test_one_poisoned_client_among_five_costs_at_most_0_005_dice():
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a busy machine
    torch.manual_seed(0)
    net = _net()
    _train(net, _make_data(100), steps=150, lr=0.02)
    parent = {k: v.detach().clone() for k, v in net.state_dict().items()}
    validation = _make_data(999, n=40)

    honest = []
    for site in range(4):
        local = _net()
        local.load_state_dict(parent)
        _train(local, _make_data(site), steps=20, lr=0.003)
        honest.append(Update(f"site{site}", {k: v.detach() - parent[k] for k, v in local.state_dict().items()},
                             staleness=site % 2, n_slices=20 + site))
    # The attacker sends a large update in the opposite direction, claiming many cases.
    poisoned = {k: -30.0 * v for k, v in honest[0].delta.items()}
    assert weights_norm(poisoned) > 20 * max(weights_norm(u.delta) for u in honest)
    updates = honest + [Update("attacker", poisoned, staleness=0, n_slices=10_000)]

    for rule in ("trimmed_mean", "median"):
        settings = MergeSettings(robust_rule=rule)
        clean_dice = _mean_dice(apply_merged(parent, merge_updates(honest, settings).delta, 1.0), validation)
        result = merge_updates(updates, settings)
        merged_dice = _mean_dice(apply_merged(parent, result.delta, 1.0), validation)
        assert merged_dice >= clean_dice - 0.005, (rule, merged_dice, clean_dice)
        assert worst_contributor(updates, result.delta) == "attacker"

    # The same buffer averaged naively is ruined: the test above has teeth.
    naive = merge_updates(updates, MergeSettings(robust_rule="mean", clip_norm=1e9))
    assert _mean_dice(apply_merged(parent, naive.delta, 1.0), validation) < clean_dice - 0.05
