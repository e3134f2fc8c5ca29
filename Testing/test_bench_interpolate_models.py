"""bench/interpolate_models.py: WiSE-FT interpolation of a fine-tune towards its base model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from bench_scripts import load_bench_script
from test_model_package import tiny_package

from dafne_logic.inference.model_package import ModelPackage

INTERPOLATE = load_bench_script("interpolate_models")


def _pair() -> tuple[ModelPackage, ModelPackage]:
    base = tiny_package()
    tuned = ModelPackage(copy.deepcopy(base.manifest), {k: v + 0.5 + 0.01 * torch.arange(v.numel()).reshape(v.shape)
                                                        for k, v in base.state_dict.items()})
    tuned.manifest.provenance = {"training": {"steps_done": 7, "final_validation": {"mean_dice": 0.9}}}
    return base, tuned


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_weights_lie_alpha_of_the_way_and_survive_saving(tmp_path, alpha):
    base, tuned = _pair()
    mixed = INTERPOLATE.interpolate(base, tuned, alpha)
    for name, weight in mixed.state_dict.items():
        expected = (1 - alpha) * base.state_dict[name] + alpha * tuned.state_dict[name]
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
    mixed.save(tmp_path / "mixed", dtype=torch.float32)
    reloaded = ModelPackage.load(tmp_path / "mixed")
    torch.testing.assert_close(reloaded.state_dict, mixed.state_dict)
    assert reloaded.manifest.created  # stamped on saving, not the tuned model's date


def test_provenance_says_how_it_was_made_and_drops_the_tuned_validation():
    base, tuned = _pair()
    mixed = INTERPOLATE.interpolate(base, tuned, 0.5)
    made = mixed.manifest.provenance["weight_interpolation"]
    assert made["alpha"] == 0.5 and "WiSE-FT" in made["method"]
    assert made["base"]["weights_sha256"] == base.manifest.weights_sha256
    assert made["tuned"]["final_validation"] == {"mean_dice": 0.9}
    assert "final_validation" not in mixed.manifest.provenance["training"]  # it described other weights
    assert mixed.manifest.provenance["training"]["steps_done"] == 7
    assert "weight_interpolation" not in tuned.manifest.provenance  # the tuned package is left as it was


def test_refuses_alpha_outside_the_segment_and_other_architectures():
    base, tuned = _pair()
    with pytest.raises(ValueError, match="alpha"):
        INTERPOLATE.interpolate(base, tuned, 1.5)
    other = copy.deepcopy(tuned)
    other.manifest.architecture = {**other.manifest.architecture, "name": "something else"}
    with pytest.raises(ValueError, match="architectures"):
        INTERPOLATE.interpolate(base, other, 0.5)
    resampled = copy.deepcopy(tuned)
    resampled.manifest.preprocessing = dataclasses.replace(resampled.manifest.preprocessing, spacing_mm=(2.0, 2.0))
    with pytest.raises(ValueError, match="prepare images differently"):
        INTERPOLATE.interpolate(base, resampled, 0.5)


def test_the_alpha_study_summary_counts_errors_over_the_target_across_muscles():
    study = load_bench_script("wise_alpha_dev")
    row = study.summarise(0.5, {"sartorius": [0.7, 0.8], "gracilis": [0.9]}, {"sartorius": [6.0, 1.0], "gracilis": [5.5]})
    assert row["over_5"] == 2 and row["n"] == 3 and row["ff_max_abs"] == 6.0
    assert row["mean_dice"] == pytest.approx(0.8) and row["ff_mean_abs"] == pytest.approx(12.5 / 3)
    assert row["muscles"]["sartorius"] == {"mean_dice": pytest.approx(0.75), "ff_max_abs": 6.0}
