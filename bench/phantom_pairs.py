"""Phantom Dixon water images with their exact labels, as a ``train --pairs`` folder (a diagnostic only).

The images come from the generator the fat-fraction benchmark draws its cases from (other seeds:
2000 onwards, against the benchmark's 100–102 and the development's 200–205), so a model trained on
them has seen that generator's infiltration texture. Never for a candidate: a model that learnt the
benchmark's generator is no longer judged by it. Written as ``phSEED.nii.gz`` and
``phSEED_labels.nii.gz``, infiltration cycling 0.2, 0.35, 0.5.

Usage: python bench/phantom_pairs.py OUT_DIR [--subjects 16] [--region thigh] [--slices 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

INFILTRATIONS = (0.2, 0.35, 0.5)
FIRST_SEED = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--region", default="thigh", choices=["thigh", "leg"])
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    import SimpleITK as sitk

    from dafne_logic.phantoms.images import make_dixon_phantom

    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.subjects):
        seed = FIRST_SEED + k
        pair = make_dixon_phantom(args.region, shape=(args.slices, 432, 432),
                                  fat_infiltration=INFILTRATIONS[k % len(INFILTRATIONS)], seed=seed)
        sitk.WriteImage(pair.water, str(args.out / f"ph{seed}.nii.gz"))
        sitk.WriteImage(pair.labels, str(args.out / f"ph{seed}_labels.nii.gz"))
        print(f"wrote ph{seed} (infiltration {INFILTRATIONS[k % len(INFILTRATIONS)]})", flush=True)


if __name__ == "__main__":
    main()
