"""Learning curve: how much Dice rises per model generation, fitted as Dafne's authors did.

Input is a table of Dice scores (one row per dataset and model version, as written by
``dafne-slicer evaluate``). Within a window of versions:

* versions are ordered by **lineage** when their manifests are known (``parents``: version →
  parent version, from the ``parent_version`` of each manifest): every ancestor comes before its
  descendants, and a chain of local fine-tunes (``"3.local-<hash>"``) keeps its parent-child order
  whatever its hashes; versions without a known parent are ordered naturally (``"9" < "10"``,
  ``"3" < "3.local-…" < "4"``);
* ``generation`` is the dense rank of the version in that order within the window, from 0;
* ``relative_dice`` is the dataset's Dice minus its Dice at its **baseline**, the first window
  version it has, and ``elapsed`` counts generations since that baseline. A dataset that lacks the
  window's first version (a site that joined later) thus starts at (0, 0) like every other: the
  model's no-intercept assumption holds for it too, and its gains are not credited to generations
  it never saw;
* the linear mixed model ``relative_dice*1000 ~ 0 + elapsed`` has a fixed slope and a random
  slope of ``elapsed`` per dataset, without intercepts (statsmodels ``mixedlm``, REML).

The slope is reported back in Dice units (per generation) with its standard error and the
two-sided Wald p-value from statsmodels.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dafne_logic.core.atomic import atomic_path
from dafne_logic.core.errors import InputError
from dafne_logic.core.numbers import strict_json

REQUIRED_COLUMNS = ("dataset", "model_version", "dice")
SCALE = 1000.0  # the reference fit models Dice x 1000 (numerically friendlier variances)
# Below this many datasets the per-dataset slope variance, and with it the slope's SE and p-value, rests
# on too few groups to mean much (two datasets gave p = 0.004 where a t-test on the same two gains gives 0.37).
FEW_DATASETS = 5


@dataclass
class LearningCurveFit:
    """Result of :func:`fit_learning_curve`; slope and SE in Dice units per generation."""

    slope: float
    standard_error: float
    p_value: float
    n_datasets: int
    n_observations: int
    versions: list[str]  # window versions in generation order (index = generation)
    random_slope_variance: float  # per-dataset slope variance, in (Dice x 1000)^2
    converged: bool
    warnings: list[str]
    few_datasets: bool = False  # fewer than FEW_DATASETS: the p-value is not to be trusted

    def to_json(self) -> dict[str, Any]:
        return strict_json(asdict(self))  # JSON has no NaN: undefined figures become null

    def summary(self) -> str:
        lines = [
            f"learning curve over versions {self.versions[0]} .. {self.versions[-1]} "
            f"({len(self.versions)} generations)",
            f"slope per generation: {self.slope:+.4f} Dice (SE {self.standard_error:.4f}, p = {self.p_value:.3g})",
            f"datasets: {self.n_datasets}, observations: {self.n_observations}",
        ]
        if not self.converged:
            lines.append("warning: the mixed model did not converge cleanly: " + "; ".join(self.warnings))
        if self.few_datasets:
            lines.append(f"warning: only {self.n_datasets} datasets; with fewer than {FEW_DATASETS} the per-dataset "
                         "variation is barely estimated and the SE and p-value are not reliable: add datasets")
        return "\n".join(lines)


def natural_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that compares digit runs as numbers: ``"9" < "10"``, ``"3" < "3.local-ab" < "4"``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.findall(r"\d+|\D+", version))


def lineage_order(versions: list[str], parents: Mapping[str, str | None] | None = None) -> list[str]:
    """``versions`` ordered so that every ancestor precedes its descendants.

    Each version is keyed by its chain of ancestors (root first, following ``parents`` while the
    parent is known; a cycle stops the walk), compared element by element with
    :func:`natural_key`: a lineage is depth-first, a chain stays in parent-child order, and
    versions without known parents fall back to natural order.
    """
    parents = parents or {}

    def chain(version: str) -> tuple[tuple[tuple[int, int | str], ...], ...]:
        path, seen = [version], {version}
        while (parent := parents.get(path[-1])) is not None and parent not in seen:
            path.append(parent)
            seen.add(parent)
        return tuple(natural_key(v) for v in reversed(path))

    return sorted(set(versions), key=chain)


def read_dice_csv(path: str | Path) -> pd.DataFrame:
    """Read an evaluate CSV; ``dataset`` and ``model_version`` are kept as strings.

    Raises:
        InputError: unreadable file, missing columns, or non-numeric Dice.
    """
    try:
        df = pd.read_csv(path, dtype={"dataset": str, "model_version": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read Dice table {path}: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"Dice table {path} lacks the column(s) {', '.join(missing)}")
    numbers = pd.to_numeric(df["dice"], errors="coerce")
    garbled = numbers.isna() & df["dice"].notna()  # an empty cell is an undefined Dice; "0.9o" is a typo
    if garbled.any():
        row = df.loc[garbled].iloc[0]
        raise InputError(f"Dice table {path}: the dice of dataset {row['dataset']!r}, version "
                         f"{row['model_version']!r} is {row['dice']!r}, not a number")
    df["dice"] = numbers
    return df


def prepare_learning_curve(df: pd.DataFrame, from_version: str | None = None,
                           to_version: str | None = None,
                           parents: Mapping[str, str | None] | None = None) -> pd.DataFrame:
    """Add ``generation``, ``elapsed`` and ``relative_dice`` to the rows inside the version window.

    Rows with a missing Dice are dropped. ``parents`` (version → parent version, from the
    manifests) orders versions by lineage (see :func:`lineage_order`). Returns columns dataset,
    model_version, dice, generation (int from 0), elapsed (generations since the dataset's
    baseline), relative_dice, sorted by dataset and generation.

    Raises:
        InputError: duplicate (dataset, version) rows, a window bound that is no version of the
            table or its lineage, or fewer than 2 versions or 2 datasets in the window.
    """
    data = df.loc[df["dice"].notna(), list(REQUIRED_COLUMNS)].copy()
    data["dataset"] = data["dataset"].astype(str)
    data["model_version"] = data["model_version"].astype(str).str.strip()
    duplicated = data.duplicated(["dataset", "model_version"])
    if duplicated.any():
        row = data.loc[duplicated].iloc[0]
        raise InputError(f"dataset {row['dataset']!r} has more than one Dice for version {row['model_version']!r}")
    bounds = [str(v) for v in (from_version, to_version) if v is not None]
    known = set(data["model_version"]) | set(parents or {}) | {p for p in (parents or {}).values() if p is not None}
    for bound in bounds:
        if bound not in known:
            raise InputError(f"version {bound!r} is neither in the Dice table nor in its models' lineage")
    order = lineage_order(list(data["model_version"]) + bounds, parents)
    position = {v: i for i, v in enumerate(order)}
    low = position[str(from_version)] if from_version is not None else 0
    high = position[str(to_version)] if to_version is not None else len(order) - 1
    data = data.loc[data["model_version"].map(lambda v: low <= position[v] <= high)]
    versions = [v for v in order if v in set(data["model_version"])]
    if len(versions) < 2:
        raise InputError(f"the version window holds {len(versions)} version(s); a learning curve needs at least 2")
    rank = {v: i for i, v in enumerate(versions)}
    data["generation"] = data["model_version"].map(rank).astype(int)
    data = data.sort_values(["dataset", "generation"]).reset_index(drop=True)
    by_dataset = data.groupby("dataset")
    data["elapsed"] = data["generation"] - by_dataset["generation"].transform("first")
    data["relative_dice"] = data["dice"] - by_dataset["dice"].transform("first")
    if data["dataset"].nunique() < 2:
        raise InputError("the learning curve needs Dice from at least 2 datasets")
    return data


def fit_learning_curve(data: pd.DataFrame) -> LearningCurveFit:
    """Fit ``relative_dice*1000 ~ 0 + elapsed`` with a random ``elapsed`` slope per dataset.

    ``data`` comes from :func:`prepare_learning_curve`.
    """
    import statsmodels.formula.api as smf

    frame = data.assign(relative_dice_x1000=data["relative_dice"] * SCALE)
    model = smf.mixedlm("relative_dice_x1000 ~ 0 + elapsed", frame, groups=frame["dataset"],
                        re_formula="0 + elapsed")
    # Gradient optimisers can stop on the zero-variance boundary with a meaningless SE; the
    # derivative-free Powell search does not. Keep the finite fit of highest REML likelihood.
    fits = []
    for method in ("bfgs", "powell"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = model.fit(reml=True, method=method)
            except (np.linalg.LinAlgError, ValueError):
                continue
        if np.isfinite(result.bse_fe["elapsed"]) and np.isfinite(result.llf):
            fits.append((result.llf, method, result, sorted({str(w.message).splitlines()[0] for w in caught})))
    if not fits:
        raise InputError("the mixed model could not be fitted to this Dice table")
    _, _, result, messages = max(fits, key=lambda f: (f[0], f[1] == "bfgs"))
    versions = list(data.sort_values("generation")["model_version"].drop_duplicates())
    return LearningCurveFit(
        slope=float(result.fe_params["elapsed"]) / SCALE,
        standard_error=float(result.bse_fe["elapsed"]) / SCALE,
        p_value=float(result.pvalues["elapsed"]),
        n_datasets=int(data["dataset"].nunique()),
        n_observations=int(len(data)),
        versions=versions,
        random_slope_variance=float(np.asarray(result.cov_re)[0, 0]),
        converged=bool(result.converged) and not messages,
        warnings=messages,
        few_datasets=int(data["dataset"].nunique()) < FEW_DATASETS,
    )


def plot_learning_curve(data: pd.DataFrame, fit: LearningCurveFit, path: str | Path, title: str = "") -> None:
    """PNG of each dataset's relative Dice (thin), their mean (bold) and the fitted slope (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for _, rows in data.groupby("dataset"):
        ax.plot(rows["generation"], rows["relative_dice"], color="0.6", linewidth=0.8, alpha=0.7)
    mean = data.groupby("generation")["relative_dice"].mean()
    ax.plot(mean.index, mean.values, color="tab:blue", linewidth=2.5, marker="o", label="mean over datasets")
    gens = np.arange(len(fit.versions))
    ax.plot(gens, fit.slope * gens, color="tab:red", linestyle="--",
            label=f"mixed model: {fit.slope:+.4f} Dice/generation (p = {fit.p_value:.2g})")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("generation (model version rank)")
    ax.set_ylabel("Dice relative to the first version")
    ax.set_xticks(gens)
    if len(gens) <= 12:
        ax.set_xticklabels(fit.versions, rotation=30, fontsize=7)
    ax.set_title(title or f"{fit.n_datasets} datasets, {fit.n_observations} observations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
