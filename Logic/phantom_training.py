"""Phantom-trained starter models: the first bundled thigh and calf models (issue 2).

These models have seen only procedural phantoms (:mod:`dafne_logic.phantoms`) in randomly drawn
contrasts, so the whole segment → correct → fine-tune → share path runs from a fresh clone. Their
manifests say ``trained_on: phantoms``; the base models trained on real anatomy replace them.

Run ``python -m dafne_logic.phantom_training --region thigh --output Logic/bundled_models/thigh``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluation import dice_counts, dice_from_counts, mean_dice
from .labels import BUILTIN_TABLES, LabelTable
from .model_package import Manifest, PreprocessingParams
from .networks import unet_architecture
from .phantoms import CONTRASTS, make_phantom
from .preprocessing import fit_to, prepare_volume
from .training import TrainConfig, train_model

log = logging.getLogger(__name__)

PATCH = {"thigh": 192, "leg": 160}  # square training patch (pixels at the model spacing)


@dataclass
class SlicePool:
    """Prepared one-leg slices of many phantoms, padded to one patch size.

    images: (n, P, P) float32 normalised; targets: (n, P, P) int64 model classes.
    """

    images: np.ndarray
    targets: np.ndarray


def build_pool(region: str, seeds: range, params: PreprocessingParams, n_slices: int = 10) -> SlicePool:
    """Phantoms of ``seeds``, each in a random contrast with random noise, bias and fat infiltration."""
    table = BUILTIN_TABLES[region]
    images, targets = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        image, labels = make_phantom(
            region, shape=(n_slices, 432, 432), contrast=str(rng.choice(CONTRASTS)), seed=seed,
            noise=float(rng.uniform(0.0, 0.08)), bias=float(rng.uniform(0.0, 0.4)),
            fat_infiltration=float(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.5)])))
        for leg in prepare_volume(image, params, labels, table).legs:
            images.append(fit_to(leg.image, PATCH[region], PATCH[region]))
            targets.append(fit_to(leg.target, PATCH[region], PATCH[region]).astype(np.int64))
    return SlicePool(np.concatenate(images), np.concatenate(targets))


def make_sampler(pool: SlicePool):
    """Batches of pool slices with random gamma, gain and noise (contrast is already varied)."""
    images, targets = torch.from_numpy(pool.images), torch.from_numpy(pool.targets)

    def sample(generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[index].clamp_min(0.0)
        gamma = torch.exp(0.3 * torch.randn(batch_size, 1, 1, generator=generator))
        gain = 1.0 + 0.1 * torch.randn(batch_size, 1, 1, generator=generator)
        x = gain * x ** gamma + 0.02 * torch.rand(batch_size, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
        return x.unsqueeze(1).float(), targets[index]

    return sample


def make_validator(pool: SlicePool, table: LabelTable):
    """Mean Dice over the muscles of a held-out pool (argmax on whole patches)."""

    def validate(net: torch.nn.Module) -> dict[str, float]:
        pred = torch.cat([net(torch.from_numpy(pool.images[i:i + 16, None])).argmax(1)
                          for i in range(0, len(pool.images), 16)]).numpy()
        dice = dice_from_counts(*dice_counts(pred, pool.targets, table.n_muscles))[1:]
        scores = {muscle.name: float(d) for muscle, d in zip(table.muscles, dice)}
        return {"mean_dice": mean_dice(scores), **scores}

    return validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", choices=sorted(BUILTIN_TABLES), required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-phantoms", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--work-dir", help="checkpoints and logs (default build/phantom-training/REGION, "
                        "outside the package so they are never shipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    table = BUILTIN_TABLES[args.region]
    params = PreprocessingParams()
    train_seeds = range(1000, 1000 + args.train_phantoms)
    val_seeds = range(5000, 5004)  # disjoint anatomy: validation never shares a phantom with training
    log.info("rendering %d training and %d validation phantoms", len(train_seeds), len(val_seeds))
    train_pool = build_pool(args.region, train_seeds, params)
    val_pool = build_pool(args.region, val_seeds, params, n_slices=4)
    command = " ".join(["python -m dafne_logic.phantom_training", *(argv if argv is not None else sys.argv[1:])])
    manifest = Manifest(
        name=args.region, region=args.region, version="0", architecture=unet_architecture(table.n_classes),
        labels=table, preprocessing=params,
        provenance={
            "trained_on": "phantoms",
            "note": "Starter model trained only on procedural phantoms; expect poor results on real MRI.",
            "command": command,
            "data_sources": [{"name": "dafne_logic.phantoms", "seeds": [train_seeds.start, train_seeds.stop],
                              "licence": "Apache-2.0 (generated)"}],
        })
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, seed=args.seed, device="auto",
                         checkpoint_every=100, val_every=max(100, args.steps // 4))

    def progress(step: int, total: int, info: dict[str, float]) -> None:
        if step % 20 == 0:
            log.info("step %d/%d loss %.4f", step, total, info["loss"])

    package = train_model(manifest, make_sampler(train_pool), config, args.output, progress=progress,
                          validate=make_validator(val_pool, table), resume=args.resume,
                          work_dir=args.work_dir or Path("build") / "phantom-training" / args.region)
    log.info("validation: %s", package.manifest.provenance["training"].get("final_validation"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
