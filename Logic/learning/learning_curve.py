"""Learning curve: how much Dice rises per model generation, fitted as Dafne's authors did.

Input is a table of Dice scores (one row per dataset and model version, as written by
``dafne-slicer evaluate``). Within a window of versions:

* ``generation`` is the dense rank of the version in the window, starting at 0;
* ``relative_dice`` is the dataset's Dice minus its Dice at the first window version it has
  (normally the window's first version), so every dataset starts at 0;
* the linear mixed model ``relative_dice*1000 ~ 0 + generation`` has a fixed slope and a random
  slope of ``generation`` per dataset, without intercepts (statsmodels ``mixedlm``, REML).

The slope is reported back in Dice units (per generation) with its standard error and the
two-sided Wald p-value from statsmodels. Versions are integers when every one parses as an
integer (then ``"10" > "9"``), otherwise they are ordered as strings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
        return "\n".join(lines)


def version_key(versions: list[str]) -> Callable[[str], Any]:
    """Sort key for versions: numeric when every version is an integer, else lexicographic."""
    try:
        for v in versions:
            int(v)
    except ValueError:
        return str
    return int


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
    df["dice"] = pd.to_numeric(df["dice"], errors="coerce")
    return df


def prepare_learning_curve(df: pd.DataFrame, from_version: str | None = None,
                           to_version: str | None = None) -> pd.DataFrame:
    """Add ``generation`` and ``relative_dice`` to the rows inside the version window.

    Rows with a missing Dice are dropped. Returns columns dataset, model_version, dice,
    generation (int from 0), relative_dice, sorted by dataset and generation.

    Raises:
        InputError: duplicate (dataset, version) rows, or fewer than 2 versions or 2 datasets in
            the window.
    """
    data = df.loc[df["dice"].notna(), list(REQUIRED_COLUMNS)].copy()
    data["dataset"] = data["dataset"].astype(str)
    data["model_version"] = data["model_version"].astype(str).str.strip()
    duplicated = data.duplicated(["dataset", "model_version"])
    if duplicated.any():
        row = data.loc[duplicated].iloc[0]
        raise InputError(f"dataset {row['dataset']!r} has more than one Dice for version {row['model_version']!r}")
    bounds = [v for v in (from_version, to_version) if v is not None]
    key = version_key(list(data["model_version"]) + [str(v) for v in bounds])
    in_window = data["model_version"].map(
        lambda v: (from_version is None or key(v) >= key(str(from_version)))
        and (to_version is None or key(v) <= key(str(to_version))))
    data = data.loc[in_window]
    versions = sorted(set(data["model_version"]), key=key)
    if len(versions) < 2:
        raise InputError(f"the version window holds {len(versions)} version(s); a learning curve needs at least 2")
    rank = {v: i for i, v in enumerate(versions)}
    data["generation"] = data["model_version"].map(rank).astype(int)
    data = data.sort_values(["dataset", "generation"]).reset_index(drop=True)
    data["relative_dice"] = data["dice"] - data.groupby("dataset")["dice"].transform("first")
    if data["dataset"].nunique() < 2:
        raise InputError("the learning curve needs Dice from at least 2 datasets")
    return data


def fit_learning_curve(data: pd.DataFrame) -> LearningCurveFit:
    """Fit ``relative_dice*1000 ~ 0 + generation`` with a random generation slope per dataset.

    ``data`` comes from :func:`prepare_learning_curve`.
    """
    import statsmodels.formula.api as smf

    frame = data.assign(relative_dice_x1000=data["relative_dice"] * SCALE)
    model = smf.mixedlm("relative_dice_x1000 ~ 0 + generation", frame, groups=frame["dataset"],
                        re_formula="0 + generation")
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
        if np.isfinite(result.bse_fe["generation"]) and np.isfinite(result.llf):
            fits.append((result.llf, method, result, sorted({str(w.message).splitlines()[0] for w in caught})))
    if not fits:
        raise InputError("the mixed model could not be fitted to this Dice table")
    _, _, result, messages = max(fits, key=lambda f: (f[0], f[1] == "bfgs"))
    versions = list(data.sort_values("generation")["model_version"].drop_duplicates())
    return LearningCurveFit(
        slope=float(result.fe_params["generation"]) / SCALE,
        standard_error=float(result.bse_fe["generation"]) / SCALE,
        p_value=float(result.pvalues["generation"]),
        n_datasets=int(data["dataset"].nunique()),
        n_observations=int(len(data)),
        versions=versions,
        random_slope_variance=float(np.asarray(result.cov_re)[0, 0]),
        converged=bool(result.converged) and not messages,
        warnings=messages,
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
