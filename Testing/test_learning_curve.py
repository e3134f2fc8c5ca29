"""Learning-curve mixed model: recovers a known slope, p-value behaviour, windows, versions, plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dafne_logic.core.errors import InputError
from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve, read_dice_csv


def synthetic_dice(slope: float, n_datasets: int = 12, n_versions: int = 8, noise: float = 0.01,
                   slope_sd: float = 0.002, seed: int = 0, versions: list[str] | None = None) -> pd.DataFrame:
    """Dice = base + (slope + per-dataset deviation) * generation + noise."""
    rng = np.random.default_rng(seed)
    versions = versions or [str(v + 1) for v in range(n_versions)]
    rows = []
    for d in range(n_datasets):
        base = rng.uniform(0.6, 0.8)
        own_slope = slope + rng.normal(0, slope_sd)
        for g, v in enumerate(versions):
            rows.append({"dataset": f"case{d:02d}", "model_version": v,
                         "dice": base + own_slope * g + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_recovers_known_slope_with_small_p():
    data = prepare_learning_curve(synthetic_dice(0.009))
    fit = fit_learning_curve(data)
    assert fit.slope == pytest.approx(0.009, abs=3 * fit.standard_error)
    assert 0.0005 < fit.standard_error < 0.003
    assert fit.p_value < 1e-3
    assert (fit.n_datasets, fit.n_observations) == (12, 96)
    assert fit.versions == [str(v) for v in range(1, 9)]


def test_no_slope_gives_no_significance():
    fit = fit_learning_curve(prepare_learning_curve(synthetic_dice(0.0, seed=3)))
    assert abs(fit.slope) < 0.003
    assert fit.p_value > 0.05


def test_generation_is_dense_rank_numeric_and_window():
    # Versions 2, 9, 10 (numeric order, not string order) with gaps; window from 9.
    df = synthetic_dice(0.01, n_datasets=3, versions=["2", "9", "10", "11"])
    data = prepare_learning_curve(df, from_version="9", to_version="11")
    assert sorted(set(data["model_version"])) == ["10", "11", "9"]
    gen = dict(zip(data["model_version"], data["generation"], strict=True))
    assert gen == {"9": 0, "10": 1, "11": 2}
    first = data[data["generation"] == 0]["relative_dice"]
    assert np.allclose(first, 0.0)
    # relative Dice is measured against the window's first version, not version 2
    one = df[(df.dataset == "case00")].set_index("model_version")["dice"]
    rel = data[(data.dataset == "case00") & (data.model_version == "11")]["relative_dice"].item()
    assert rel == pytest.approx(one["11"] - one["9"])


def test_string_versions_sort_lexicographically():
    df = synthetic_dice(0.01, n_datasets=3, versions=["3.local-aa", "3.local-bb", "4"])
    data = prepare_learning_curve(df)
    assert list(data[data.dataset == "case00"]["model_version"]) == ["3.local-aa", "3.local-bb", "4"]


def test_bad_tables_are_refused(tmp_path):
    df = synthetic_dice(0.01, n_datasets=3)
    with pytest.raises(InputError, match="at least 2"):
        prepare_learning_curve(df, from_version="8")
    with pytest.raises(InputError, match="at least 2 datasets"):
        prepare_learning_curve(df[df.dataset == "case00"])
    with pytest.raises(InputError, match="more than one"):
        prepare_learning_curve(pd.concat([df, df.iloc[:1]]))
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,dice\na,0.5\n")
    with pytest.raises(InputError, match="model_version"):
        read_dice_csv(bad)
    # A typo in a Dice cell was dropped without a word; an empty cell is an undefined Dice and stays allowed.
    bad.write_text("dataset,model_version,dice\na,1,0.8\na,2,0.9o\nb,1,\nb,2,0.7\n")
    with pytest.raises(InputError, match="version '2' is '0.9o', not a number"):
        read_dice_csv(bad)
    # A window bound that is no version was silently taken as a position between versions.
    with pytest.raises(InputError, match="version '2.5' is neither"):
        prepare_learning_curve(df, from_version="2.5")


def test_a_fit_on_few_datasets_says_its_p_value_is_not_reliable():
    few = fit_learning_curve(prepare_learning_curve(synthetic_dice(0.01, n_datasets=2, n_versions=2)))
    assert few.few_datasets and "only 2 datasets" in few.summary() and "not reliable" in few.summary()
    enough = fit_learning_curve(prepare_learning_curve(synthetic_dice(0.009)))
    assert not enough.few_datasets and "not reliable" not in enough.summary()


def test_plot_and_json(tmp_path):
    data = prepare_learning_curve(synthetic_dice(0.009, n_datasets=4))
    fit = fit_learning_curve(data)
    png = tmp_path / "curve.png"
    plot_learning_curve(data, fit, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blob = json.loads(json.dumps(fit.to_json()))
    assert blob["n_datasets"] == 4 and blob["slope"] == pytest.approx(fit.slope)


def test_report_command_end_to_end(tmp_path, capsys):
    from dafne_logic.cli import main

    csv = tmp_path / "dice.csv"
    synthetic_dice(0.009, n_datasets=6).to_csv(csv, index=False)
    out_json, out_png = tmp_path / "fit.json", tmp_path / "fit.png"
    rc = main(["report", "--dice-csv", str(csv), "--from", "2", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "slope per generation" in printed and "datasets: 6, observations: 42" in printed
    fit = json.loads(out_json.read_text())
    assert fit["versions"][0] == "2" and fit["n_observations"] == 42
    assert 0.005 < fit["slope"] < 0.013 and fit["p_value"] < 1e-3
    assert out_png.stat().st_size > 1000
    # a bad table: one line on stderr, exit 2, nothing written
    bad = tmp_path / "bad.csv"
    bad.write_text("dataset,model_version\n")
    assert main(["report", "--dice-csv", str(bad), "--json", str(tmp_path / "no.json")]) == 2
    assert "lacks the column" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()
    table = csv.read_bytes()
    assert main(["report", "--dice-csv", str(csv), "--json", str(csv)]) == 2  # would replace its own input
    assert "overwrite one of this command's inputs" in capsys.readouterr().err and csv.read_bytes() == table


def test_local_versions_follow_their_parent_chain_not_their_hashes():
    # The chain 3 -> 3.local-ff -> 3.local-0a -> 3.local-7c: the hashes sort the other way round.
    chain = ["3", "3.local-ff", "3.local-0a", "3.local-7c"]
    parents = {"3": "2", "3.local-ff": "3", "3.local-0a": "3.local-ff", "3.local-7c": "3.local-0a"}
    df = synthetic_dice(0.02, n_datasets=6, versions=chain, noise=0.002)
    data = prepare_learning_curve(df, parents=parents)
    assert dict(zip(data["model_version"], data["generation"], strict=True)) == {v: g for g, v in enumerate(chain)}
    fit = fit_learning_curve(data)
    assert fit.versions == chain and fit.slope == pytest.approx(0.02, abs=0.005)
    # The window is a stretch of the lineage.
    window = prepare_learning_curve(df, from_version="3.local-ff", to_version="3.local-0a", parents=parents)
    assert sorted(set(window["model_version"])) == ["3.local-0a", "3.local-ff"]


def test_dataset_missing_the_windows_first_version_counts_from_its_own_baseline():
    """A site that joined at generation 3 starts at (0, 0): its gain is not spread over generations
    it never saw, so the fitted slope stays the true one."""
    df = synthetic_dice(0.01, n_datasets=10, n_versions=6, noise=0.001, slope_sd=0.0005, seed=1)
    late = df["dataset"].isin([f"case{d:02d}" for d in range(5)]) & df["model_version"].isin(["1", "2", "3"])
    data = prepare_learning_curve(df.loc[~late])
    joined = data[data["dataset"] == "case00"]
    assert list(joined["generation"]) == [3, 4, 5] and list(joined["elapsed"]) == [0, 1, 2]
    assert joined["relative_dice"].iloc[0] == 0.0
    fit = fit_learning_curve(data)
    assert fit.slope == pytest.approx(0.01, abs=0.001)


def test_report_reads_the_lineage_from_manifests(tmp_path, capsys):
    from dafne_logic.cli import main
    from dafne_logic.inference.model_package import load_model

    chain = ["2", "2.local-ff", "2.local-0a"]
    models = tmp_path / "models"
    leg = load_model("leg")
    for version, parent in zip(chain[1:], chain[:-1], strict=True):
        leg.manifest.version, leg.manifest.parent_version = version, parent
        leg.save(models / f"leg-{version}")
    csv = tmp_path / "dice.csv"
    synthetic_dice(0.01, n_datasets=4, versions=chain).to_csv(csv, index=False)
    out = tmp_path / "fit.json"
    assert main(["report", "--dice-csv", str(csv), "--models", str(models), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["versions"] == chain
    assert main(["report", "--dice-csv", str(csv), "--models", str(tmp_path / "nothing-here")]) == 2
    assert "neither a model folder" in capsys.readouterr().err
    # Another family's version of the same name with another parent: name the family.
    leg.manifest.name, leg.manifest.version, leg.manifest.parent_version = "calf2", "2.local-0a", "9"
    leg.save(models / "calf2-local")
    assert main(["report", "--dice-csv", str(csv), "--models", str(models)]) == 2
    assert "two parents" in capsys.readouterr().err
    assert main(["report", "--dice-csv", str(csv), "--models", str(models), "--family", "leg", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["versions"] == chain
