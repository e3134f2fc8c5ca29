"""Merge rules: pure functions over weight deltas, apart from transport and storage.

An *update* is one site's delta (``child - parent`` per floating tensor, see
:mod:`dafne_logic.learning.delta`) with its staleness ``τ`` (how many versions were published after its
parent) and the number of corrected slices it was trained on. The server feeds buffers of K
updates to :func:`merge_updates` (FedBuff, Nguyen et al. 2022); K = 1 is FedAsync (Xie et al.
2019), whose constant-mixing special case is the reference tool's rule.

Robustness, in order:

1. every delta is scaled by its staleness weight ``(1 + τ)^-½``;
2. every delta is clipped to a norm bound (a fixed bound, or the buffer's lower median norm when
   it holds ≥ 2 updates, so one huge update cannot dominate: with two, the smaller sets the bound);
3. case counts (claimed by the client) are capped at the buffer's lower median count when it holds
   ≥ 2 updates: with two, both count the same, so claiming 100,000 slices buys nothing;
4. with ≥ 3 updates the location is a coordinate-wise median (one vote per update) or trimmed
   mean weighted by the capped case counts; otherwise their weighted mean.

An update whose influence these rules cut to less than half of what it claimed (norm clipped,
case count capped, or its values left out at most coordinates) is reported in
:attr:`MergeResult.overridden`: the server marks it *overridden*, not *merged*.

:func:`accept_candidate` is the publication gate: a candidate may not lose more than ε mean Dice
or δ on any label against the active version on the validation cases. When it refuses, the
server drops one update and tries again: with ≥ 3 updates the one farthest from the merged delta
(:func:`worst_contributor`: a majority defines the centre), with two the one whose candidate
scores lower on its own (:func:`lowest_scoring`: two updates are equally far from their mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dafne_logic.core.numbers import nanmean
from dafne_logic.learning.delta import weights_norm

Delta = dict[str, torch.Tensor]
RobustRule = Literal["trimmed_mean", "median", "mean"]


@dataclass(frozen=True)
class MergeSettings:
    """How a family's buffered updates become a candidate, and when a candidate is published."""

    buffer_size: int = 3  # K: updates per merge; 1 = FedAsync
    server_lr: float = 1.0  # η: the aggregated delta is applied as ``active + η·Δ``
    robust_rule: RobustRule = "trimmed_mean"  # used when ≥ 3 updates are merged
    trim_fraction: float = 0.2  # per side; at least one value per side is trimmed
    clip_norm: float | None = None  # fixed L2 bound; None = lower median norm of the buffer (≥ 2 updates)
    max_case_weight: int = 200  # slices counted per update at most, so one site cannot dominate
    max_staleness: int = 5  # updates whose parent is older are rejected
    dice_tolerance: float = 0.005  # ε: allowed loss of mean Dice against the active version
    label_tolerance: float = 0.02  # δ: allowed loss on any single label

    def __post_init__(self) -> None:
        # Stored settings are JSON an admin may have written null or a string into: refuse before comparing.
        for name in ("buffer_size", "server_lr", "trim_fraction", "max_case_weight", "max_staleness",
                     "dice_tolerance", "label_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if not (0.0 <= self.dice_tolerance <= 1.0 and 0.0 <= self.label_tolerance <= 1.0):
            raise ValueError("dice_tolerance and label_tolerance must be in [0, 1]")
        if self.buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.robust_rule not in ("trimmed_mean", "median", "mean"):
            raise ValueError(f"unknown robust rule {self.robust_rule!r}")
        if self.server_lr <= 0 or self.max_staleness < 0 or self.max_case_weight < 1:
            raise ValueError("server_lr must be positive, max_staleness ≥ 0, max_case_weight ≥ 1")

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping) -> MergeSettings:
        """Stored settings; a ``null`` where a number belongs (which earlier versions let an admin store)
        takes the default, so one family's bad record cannot stop the merges and uploads of all."""
        optional = {"clip_norm"}
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and (data[k] is not None or k in optional)}
        return cls(**known)


@dataclass(frozen=True)
class Update:
    """One buffered contribution, as the merge rules see it."""

    key: str  # the server's update id
    delta: Delta
    staleness: int  # τ ≥ 0
    n_slices: int  # corrected slices the site trained on


OVERRIDE_SHARE = 0.5  # an update keeping less than this share of its claimed influence was overridden


@dataclass
class MergeResult:
    delta: Delta  # aggregated delta, to apply as ``active + server_lr · delta``
    rule: str  # which location estimate was used
    weights: dict[str, float]  # normalised case weight per update key
    norms: dict[str, float] = field(default_factory=dict)  # norm of each update after staleness scaling
    clip_bound: float | None = None
    overridden: dict[str, str] = field(default_factory=dict)  # update key -> how the robust rules overrode it


def staleness_weight(staleness: int) -> float:
    """``(1 + τ)^-½``: 1 for a fresh update, 0.5 for one three versions old."""
    if staleness < 0:
        raise ValueError("staleness cannot be negative")
    return (1.0 + staleness) ** -0.5


def clip_delta(delta: Delta, max_norm: float) -> Delta:
    """Scale ``delta`` down to L2 norm ``max_norm`` if it is larger; unchanged otherwise."""
    norm = weights_norm(delta)
    if norm <= max_norm or norm == 0.0:
        return delta
    factor = max_norm / norm
    return {k: v * factor for k, v in delta.items()}


def _stack(deltas: Sequence[Delta], name: str) -> torch.Tensor:
    return torch.stack([d[name].float() for d in deltas])  # (n_updates, *shape)


def weighted_mean(deltas: Sequence[Delta], weights: torch.Tensor) -> Delta:
    """Σ wᵢ·Δᵢ with ``weights`` (n,) summing to 1."""
    return {k: torch.tensordot(weights, _stack(deltas, k), dims=1) for k in deltas[0]}


def _sorted_with_weights(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort ``values`` (n, ...) along the update axis; carry each value's weight along."""
    order = torch.argsort(values, dim=0)
    sorted_values = torch.gather(values, 0, order)
    sorted_weights = weights[order]  # (n, ...): the weight of whichever update sits at each rank
    return sorted_values, sorted_weights


def coordinate_median(deltas: Sequence[Delta], weights: torch.Tensor) -> Delta:
    """Coordinate-wise weighted median: per coordinate, the first value whose cumulative weight ≥ ½.

    :func:`merge_updates` passes uniform weights (one vote per update): case counts are claimed by
    the client and must not let one update choose the median.
    """
    out: Delta = {}
    for k in deltas[0]:
        values, w = _sorted_with_weights(_stack(deltas, k), weights)
        index = (torch.cumsum(w, dim=0) < 0.5 - 1e-9).sum(dim=0, keepdim=True).clamp(max=len(deltas) - 1)
        out[k] = torch.gather(values, 0, index).squeeze(0)
    return out


def trimmed_mean(deltas: Sequence[Delta], weights: torch.Tensor, trim_fraction: float) -> Delta:
    """Coordinate-wise weighted mean after dropping the ``t`` lowest and ``t`` highest values.

    ``t = max(1, floor(trim_fraction · n))`` and at least one value is kept.
    """
    n = len(deltas)
    t = _trim_count(n, trim_fraction)
    out: Delta = {}
    for k in deltas[0]:
        values, w = _sorted_with_weights(_stack(deltas, k), weights)
        w = w.clone()
        w[:t] = 0.0
        w[n - t:] = 0.0
        out[k] = (values * w).sum(dim=0) / w.sum(dim=0).clamp_min(1e-12)
    return out


def check_compatible(updates: Sequence[Update]) -> None:
    """All deltas must have the same tensor names and shapes."""
    first = updates[0].delta
    for u in updates[1:]:
        if u.delta.keys() != first.keys() or any(u.delta[k].shape != first[k].shape for k in first):
            raise ValueError(f"update {u.key} does not match the tensor layout of update {updates[0].key}")


def kept_share(deltas: Sequence[Delta], rule: RobustRule, trim_fraction: float) -> torch.Tensor:
    """Per update (n,), the fraction of coordinates at which its value entered the robust location.

    Trimmed mean: values ranked outside the ``t`` lowest and ``t`` highest; median (uniform
    weights, as :func:`merge_updates` uses it): the value at rank ``(n - 1) // 2``. An average
    update keeps :func:`_expected_share`; one that is always the extreme keeps none.
    """
    n = len(deltas)
    t = _trim_count(n, trim_fraction)
    ranks = [(n - 1) // 2] if rule == "median" else range(t, n - t)
    kept = torch.zeros(n)
    total = 0
    for k in deltas[0]:
        values = _stack(deltas, k).reshape(n, -1)
        # Where every update has the same value (an unchanged parameter, or one that rounds alike in
        # fp16) no update was left out, but argsort would credit the ranks to the same ones each time.
        differ = values.amax(dim=0) > values.amin(dim=0)
        order = torch.argsort(values[:, differ], dim=0)  # (rank, coordinate) -> update
        for r in ranks:
            kept += torch.bincount(order[r], minlength=n).float()
        total += order.shape[1]
    return kept / total if total else torch.full((n,), _expected_share(n, rule, trim_fraction))


def _trim_count(n: int, trim_fraction: float) -> int:
    """Values trimmed per side: ``max(1, floor(trim_fraction · n))``, keeping at least one."""
    return min(max(1, int(trim_fraction * n)), (n - 1) // 2)


def _expected_share(n: int, rule: RobustRule, trim_fraction: float) -> float:
    """The share of coordinates an average update keeps under ``rule``."""
    return 1.0 / n if rule == "median" else (n - 2 * _trim_count(n, trim_fraction)) / n


def overridden_updates(updates: Sequence[Update], claimed: torch.Tensor, counted: torch.Tensor,
                       norms: Sequence[float], bound: float | None, shares: torch.Tensor | None,
                       expected_share: float) -> dict[str, str]:
    """Which updates the robust rules cut to less than :data:`OVERRIDE_SHARE` of their claim, and how.

    ``claimed``/``counted``: (n,) case counts before and after the median cap; ``norms``: after
    staleness scaling; ``shares``: :func:`kept_share` (None when the location is a plain mean).
    """
    out = {}
    for i, u in enumerate(updates):
        why = []
        if bound is not None and norms[i] > 0 and bound / norms[i] < OVERRIDE_SHARE:
            why.append(f"norm {norms[i]:.4g} clipped to {bound:.4g}")
        if counted[i] < OVERRIDE_SHARE * claimed[i]:
            why.append(f"{u.n_slices} claimed slices counted as {int(counted[i])}")
        if shares is not None and shares[i] < OVERRIDE_SHARE * expected_share:
            why.append(f"its values were left out at {100 * (1 - float(shares[i])):.0f}% of coordinates")
        if why:
            out[u.key] = "overridden by the robust merge rules: " + "; ".join(why)
    return out


def merge_updates(updates: Sequence[Update], settings: MergeSettings) -> MergeResult:
    """Aggregate buffered updates into one delta (see the module docstring for the steps).

    Returns a :class:`MergeResult` whose ``delta`` has the same names and shapes as the inputs.
    """
    if not updates:
        raise ValueError("nothing to merge")
    check_compatible(updates)
    n = len(updates)
    scaled = [{k: v.float() * staleness_weight(u.staleness) for k, v in u.delta.items()} for u in updates]
    norms = [weights_norm(d) for d in scaled]
    if settings.clip_norm is not None:
        bound: float | None = settings.clip_norm
    elif n >= 2:
        bound = float(torch.tensor(norms).median())  # the lower median: with two, the smaller norm
    else:
        bound = None
    clipped = scaled if bound is None else [clip_delta(d, bound) for d in scaled]
    claimed = torch.tensor([float(min(max(u.n_slices, 1), settings.max_case_weight)) for u in updates])
    # Case counts are claimed by the client: none counts more than a typical site (with two, the smaller).
    case = claimed.clamp(max=float(claimed.median())) if n >= 2 else claimed
    weights = case / case.sum()
    shares = None
    if n >= 3 and settings.robust_rule == "median":
        rule, delta = "median", coordinate_median(clipped, torch.full((n,), 1.0 / n))
    elif n >= 3 and settings.robust_rule == "trimmed_mean":
        rule, delta = "trimmed_mean", trimmed_mean(clipped, weights, settings.trim_fraction)
    else:
        rule, delta = ("fedasync" if n == 1 else "mean"), weighted_mean(clipped, weights)
    if rule in ("median", "trimmed_mean"):
        shares = kept_share(clipped, rule, settings.trim_fraction)  # type: ignore[arg-type]
    # Claims as sent: a cut to the typical site's count or to max_case_weight overrides them; with one
    # update (FedAsync) the count weighs nothing, so nothing is cut.
    raw_claims = torch.tensor([float(max(u.n_slices, 1)) for u in updates]) if n >= 2 else case
    return MergeResult(
        delta=delta,
        rule=rule,
        weights={u.key: float(w) for u, w in zip(updates, weights, strict=True)},
        norms={u.key: v for u, v in zip(updates, norms, strict=True)},
        clip_bound=bound,
        overridden=overridden_updates(updates, raw_claims, case, norms, bound, shares,
                                      _expected_share(n, rule, settings.trim_fraction)),  # type: ignore[arg-type]
    )


def worst_contributor(updates: Sequence[Update], merged: Delta) -> str:
    """Key of the update farthest (L2, after staleness scaling) from the merged delta."""
    def distance(u: Update) -> float:
        w = staleness_weight(u.staleness)
        return weights_norm({k: u.delta[k].float() * w - merged[k] for k in merged})

    return max(updates, key=distance).key


def apply_merged(active: dict[str, torch.Tensor], merged: Delta, server_lr: float) -> dict[str, torch.Tensor]:
    """``active + η·Δ`` in float32; tensors absent from the delta are copied."""
    return {k: (v.float() + server_lr * merged[k]) if k in merged else v.clone() for k, v in active.items()}


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    candidate_mean: float
    active_mean: float


def accept_candidate(candidate: Mapping[str, float], active: Mapping[str, float],
                     dice_tolerance: float, label_tolerance: float) -> Decision:
    """Publication gate over Dice per label (NaN = label absent from a case set, ignored).

    Accepted when the candidate's mean Dice ≥ the active version's − ε and no label loses more than δ,
    both over the labels defined for both: a label undefined for one of them (absent from every
    reference, predicted by one model only) would otherwise move one mean and not the other.
    """
    shared = [name for name, value in candidate.items()
              if name in active and not math.isnan(value) and not math.isnan(active[name])]
    if shared:
        cand_mean, act_mean = nanmean(candidate[n] for n in shared), nanmean(active[n] for n in shared)
    else:
        cand_mean, act_mean = nanmean(candidate.values()), nanmean(active.values())
    if math.isnan(cand_mean):
        return Decision(False, "the candidate has no defined Dice on the validation cases", cand_mean, act_mean)
    if not math.isnan(act_mean) and cand_mean < act_mean - dice_tolerance:
        return Decision(False, f"mean Dice {cand_mean:.4f} is below the active version's {act_mean:.4f} "
                               f"by more than {dice_tolerance}", cand_mean, act_mean)
    drops = {name: active[name] - value for name, value in candidate.items()
             if name in active and not math.isnan(value) and not math.isnan(active[name])}
    worst = max(drops.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > label_tolerance:
        return Decision(False, f"Dice of {worst[0]} drops by {worst[1]:.4f} (more than {label_tolerance})",
                        cand_mean, act_mean)
    return Decision(True, f"mean Dice {cand_mean:.4f} (active {act_mean:.4f})", cand_mean, act_mean)


def lowest_scoring(decisions: Mapping[str, Decision]) -> str:
    """Key of the candidate with the lowest mean Dice (an undefined mean counts lowest)."""
    return min(decisions, key=lambda k: -math.inf if math.isnan(decisions[k].candidate_mean)
               else decisions[k].candidate_mean)
