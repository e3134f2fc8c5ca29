"""Interpolate a fine-tuned model's weights back towards the model it was fine-tuned from.

``weights = base + alpha * (tuned - base)``, tensor by tensor (fp32 arithmetic), for two packages of
the same architecture and label table: WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022), where the halfway point of a model and its own fine-tune kept most of the
fine-tune's gains while losing less on data neither was tuned on. Here it is one way to keep a CPU
trial's gains (trial v10: phantom Dice and mean fat-fraction error) while staying nearer the shipped
model on the few muscles where a trial moved the wrong way.

The result is a package like any other; its manifest is the tuned model's, with the trainer's
``final_validation`` (which described the tuned weights, not these) moved into
``provenance.weight_interpolation`` beside ``alpha`` and both parents' names, versions and weights' sha256.

Usage: python bench/interpolate_models.py BASE TUNED --alpha 0.5 --output OUT_DIR
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from dafne_logic.inference.model_package import ModelPackage, load_model
from dafne_logic.learning.delta import apply_delta

WISE_FT = "linear interpolation of weights, base + alpha * (tuned - base) (WiSE-FT, Wortsman et al. 2022)"


def interpolate(base: ModelPackage, tuned: ModelPackage, alpha: float) -> ModelPackage:
    """The package whose weights are ``base + alpha * (tuned - base)`` (alpha in [0, 1]).

    Raises:
        ValueError: alpha outside [0, 1], or packages of different architectures, label tables or
            preprocessing.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    if base.manifest.architecture != tuned.manifest.architecture:
        raise ValueError("the two models have different architectures")
    if base.labels.to_json() != tuned.labels.to_json():
        raise ValueError("the two models have different label tables")
    if base.manifest.preprocessing != tuned.manifest.preprocessing:
        raise ValueError("the two models prepare images differently (spacing, margins or percentiles)")
    # Differences in fp32 (make_delta would round them to fp16 before the scale).
    delta = {k: tuned.state_dict[k].float() - base.state_dict[k].float() for k in base.state_dict}
    weights = apply_delta(base.state_dict, delta, scale=alpha)
    manifest = copy.deepcopy(tuned.manifest)
    training = dict(manifest.provenance.get("training", {}))
    tuned_validation = training.pop("final_validation", None)
    manifest.provenance = {
        **manifest.provenance,
        "training": training,
        "weight_interpolation": {
            "method": WISE_FT,
            "alpha": alpha,
            "base": _describe(base),
            "tuned": {**_describe(tuned), "final_validation": tuned_validation},
        },
    }
    manifest.created = ""  # stamped when saved
    return ModelPackage(manifest, weights)


def _describe(package: ModelPackage) -> dict:
    manifest = package.manifest
    # The sha256 names the weights; a path on the machine that made it would mean nothing elsewhere.
    return {"name": manifest.name, "version": manifest.version, "weights_sha256": manifest.weights_sha256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the model fine-tuned from (a bundled name or a package folder)")
    parser.add_argument("tuned", help="its fine-tune (a package folder)")
    parser.add_argument("--alpha", type=float, default=0.5, help="0 = base, 1 = tuned (default 0.5)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    package = interpolate(load_model(args.base), load_model(args.tuned), args.alpha)
    package.save(args.output)
    print(f"{args.output}: {args.alpha:g} of the way from {args.base} to {args.tuned}")


if __name__ == "__main__":
    main()
