"""``--synthesis KEY=VALUE`` (train, evaluate_base_models): ranges of the image synthesis changed by name."""

from __future__ import annotations

import re

import pytest

from dafne_logic.training.synthesis import SynthesisConfig, synthesis_overrides


def test_overrides_are_json_values_that_the_synthesis_takes():
    changes = synthesis_overrides(["p_infiltration=0.3", "infiltration_affected=[0.5, 0.5]"])
    assert changes == {"p_infiltration": 0.3, "infiltration_affected": (0.5, 0.5)}
    config = SynthesisConfig(**changes)
    assert config.infiltration_affected == (0.5, 0.5) and config.p_infiltration == 0.3
    assert synthesis_overrides([]) == {}
    assert synthesis_overrides(["rotation_deg=20", "rotation_deg=25"]) == {"rotation_deg": 25.0}  # the last one


@pytest.mark.parametrize("setting, message", [
    ("no_such_range=1", "not a SynthesisConfig range"),
    ("regimes=[\"t1\"]", "not a SynthesisConfig range"),  # the caller sets the regimes itself
    ("size=[64,64]", "not a SynthesisConfig range"),  # the recipe's crop
    ("p_infiltration=0,3", "not JSON"),
    ("infiltration_affected=0.5", "infiltration_affected is a [low, high] pair"),  # a share range, not a number
    ("infiltration_affected=[0.8,0.2]", "infiltration_affected needs low <= high"),
    ("p_infiltration", "write KEY=VALUE"),
    ("p_infiltation=0.5", "did you mean p_infiltration"),
    ("p_infiltration=5", "a probability, between 0 and 1"),
    ("p_bone=true", "p_bone is a finite number"),
    ("rotation_deg=NaN", "rotation_deg is a finite number"),
    ("blur_px=-1", "blur_px is a finite number >= 0"),
    ("scale=0.9", "scale is a [low, high] pair"),
    ("noise=[0.1]", "noise is a [low, high] pair"),
    ("scale=[1.2,0.8]", "scale needs low <= high"),
])
def test_bad_overrides_are_refused_with_the_setting_named(setting: str, message: str):
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        synthesis_overrides([setting])
    assert setting in str(refused.value)
