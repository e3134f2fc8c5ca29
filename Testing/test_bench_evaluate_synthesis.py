"""bench/evaluate_base_models.py --synthesis: the held-out images can be drawn by an earlier synthesis."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dafne_logic.training.synthesis import SynthesisConfig

REPO = Path(__file__).resolve().parents[1]


def load_evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_base_models", REPO / "bench" / "evaluate_base_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EVALUATE = load_evaluate()


def test_overrides_are_json_values_that_the_synthesis_takes():
    changes = EVALUATE.synthesis_overrides(["p_infiltration=0.3", "infiltration_affected=[0.5, 0.5]"])
    assert changes == {"p_infiltration": 0.3, "infiltration_affected": (0.5, 0.5)}
    config = SynthesisConfig(**changes)
    assert config.infiltration_affected == (0.5, 0.5) and config.p_infiltration == 0.3
    assert EVALUATE.synthesis_overrides([]) == {}


@pytest.mark.parametrize("setting, message", [
    ("no_such_range=1", "not a SynthesisConfig range"),
    ("regimes=[\"t1\"]", "not a SynthesisConfig range"),  # the evaluation sets the regime itself
    ("p_infiltration=0,3", "not JSON"),
])
def test_bad_overrides_are_refused_with_the_setting_named(setting: str, message: str):
    with pytest.raises(SystemExit, match=message) as refused:
        EVALUATE.synthesis_overrides([setting])
    assert setting in str(refused.value)
