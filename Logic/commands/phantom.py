"""``dafne-slicer phantom``: write a procedural thigh or calf phantom (image + label map + label table).

``--contrast water`` and ``--contrast fat`` with the same seed and options make a consistent Dixon
pair; both also write ``<region>_phantom_fat_fraction.csv``, the true fat fraction per muscle.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import SimpleITK as sitk

from dafne_logic.core.atomic import atomic_path, atomic_write_text
from dafne_logic.phantoms.anatomy import REGIONS
from dafne_logic.phantoms.images import CONTRASTS


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", required=True, choices=sorted(REGIONS), help="thigh or leg (calf)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder for <region>_phantom.nii.gz and <region>_phantom_labels.nii.gz (+ .json)")
    parser.add_argument("--contrast", default="t1", choices=CONTRASTS,
                        help="intensity regime (default t1); water and fat of one seed form a Dixon pair")
    parser.add_argument("--seed", type=int, default=0, help="random subject (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(40, 432, 432),
                        help="voxels (default 40 432 432)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="voxel size in mm (default: the field of view fits the body, 5 or 6 mm slices)")
    parser.add_argument("--legs", default="both", choices=("both", "right", "left"), help="legs drawn")
    parser.add_argument("--touching", action="store_true", help="the two legs press against each other")
    parser.add_argument("--noise", type=float, default=0.03, help="Rician noise SD relative to muscle (default 0.03)")
    parser.add_argument("--bias", type=float, default=0.2, help="bias field strength (default 0.2)")
    parser.add_argument("--fat-infiltration", type=float, default=0.0,
                        help="fraction of muscle replaced by fat, 0..1 (default 0)")
    parser.add_argument("--slice-thickness", type=float, metavar="MM", help="slice thickness beyond the spacing")
    parser.set_defaults(func=run)


DIXON_CONTRASTS = ("water", "fat")


def run(args: argparse.Namespace) -> int:
    from dafne_logic.core.io import write_labels
    from dafne_logic.phantoms.images import make_phantom

    start = time.perf_counter()
    geometry = dict(shape=tuple(args.shape), spacing=None if args.spacing is None else tuple(args.spacing),
                    legs=args.legs, touching=args.touching, fat_infiltration=args.fat_infiltration, seed=args.seed)
    image, labels = make_phantom(args.region, contrast=args.contrast, noise=args.noise, bias=args.bias,
                                 slice_thickness_mm=args.slice_thickness, **geometry)
    truth = true_fat_fraction_csv(args.region, geometry) if args.contrast in DIXON_CONTRASTS else None
    output = Path(args.output)
    image_path = output / f"{args.region}_phantom.nii.gz"
    labels_path = output / f"{args.region}_phantom_labels.nii.gz"
    # The image appears only once the label map, its table and the fat-fraction truth are written too.
    with atomic_path(image_path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        written = write_labels(labels, labels_path, REGIONS[args.region].table)
        if truth is not None:
            truth_path = output / f"{args.region}_phantom_fat_fraction.csv"
            atomic_write_text(truth_path, truth)
            written.append(truth_path)
    spacing = ", ".join(f"{s:g}" for s in image.GetSpacing())
    print(f"{args.region} phantom (seed {args.seed}, {args.contrast}, {image.GetSize()[::-1]} z,y,x voxels, "
          f"spacing {spacing} mm) in {time.perf_counter() - start:.1f} s:")
    for path in (image_path, *written):
        print(f"  {path}")
    return 0


def true_fat_fraction_csv(region: str, geometry: dict) -> str:
    """CSV ``label_value,name,fat_fraction_true`` (percent) of the muscles the phantom drew."""
    from dafne_logic.phantoms.images import true_fat_fraction

    _, per_label = true_fat_fraction(region, **geometry)
    names = {label.value: label.name for label in REGIONS[region].table.volume_labels()}
    lines = ["label_value,name,fat_fraction_true"]
    lines += [f"{value},{names[value]},{percent:.4f}" for value, percent in sorted(per_label.items())]
    return "\n".join(lines) + "\n"
