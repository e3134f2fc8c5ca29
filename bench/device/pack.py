"""Pack what a lent GPU machine needs to train the base models into ``.device-pack/`` (run here).

The device machine has PyTorch, NumPy, SciPy, safetensors and tqdm but no MONAI or SimpleITK, and
``../shared`` does not travel to it. This copies the label maps and the real calf slices (their
images are used there only to score the leave-one-anatomy-out models, never to train) and
downloads the two missing wheels for the device's Python (3.12, manylinux x86-64). A wheel over
``REPACK_OVER_MB`` (SimpleITK's, about 53 MB) is rewritten with LZMA compression (about 29 MB, same
files and RECORD; pip reads it), so that the working tree, the data and the wheels stay under the
64 MiB a call may carry.

Usage: python bench/device/pack.py [--data ../shared/data] [--pack .device-pack]
Then: bench/device/train_on_device.sh (see its header and Docs/training.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA_FOLDERS = ("thigh_label_maps", "lowerbody_label_maps", "visible_human_label_maps", "calf_slices")
# What the device's Python lacks (its KINDS.md list); the versions are this environment's. nibabel:
# read_image checks NIfTI files for NaN with it, and the leave-one-anatomy-out folds read the NIfTI calf slices.
WHEELS = ("monai", "SimpleITK", "nibabel")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
REPACK_OVER_MB = 20.0
CARRY_LIMIT_MB = 64 * 1.048576  # 64 MiB


def repack_lzma(wheel: Path) -> None:
    """Rewrite ``wheel`` in place with every member LZMA-compressed (contents and RECORD unchanged)."""
    packed = wheel.with_suffix(".lzma-tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_LZMA) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    packed.replace(wheel)


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def tree_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def tracked_mb() -> float:
    """MB of the working tree a call copies: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file()) / 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--pack", type=Path, default=REPO / ".device-pack")
    args = parser.parse_args(argv)
    missing = [name for name in DATA_FOLDERS if not (args.data / name).is_dir()]
    if missing:
        print(f"{args.data}: {', '.join(missing)} absent (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    if args.pack.exists():
        _make_writable(args.pack)
        shutil.rmtree(args.pack)
    for name in DATA_FOLDERS:  # copies of read-only data stay writable, so the next pack can replace them
        shutil.copytree(args.data / name, args.pack / "data" / name, copy_function=shutil.copyfile)
    _make_writable(args.pack)
    wheels = args.pack / "wheels"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(wheels), *pins]
    if subprocess.run(command).returncode != 0:
        print(f"could not download {' '.join(pins)} (pip needs the package index)", file=sys.stderr)
        return 1
    for wheel in wheels.glob("*.whl"):
        if wheel.stat().st_size / 1e6 > REPACK_OVER_MB:
            repack_lzma(wheel)
    total = tracked_mb() + tree_mb(args.pack)
    print(f"{args.pack}: data {tree_mb(args.pack / 'data'):.1f} MB, wheels {tree_mb(wheels):.1f} MB "
          f"({', '.join(pins)}); with the working tree {total:.1f} MB of the {CARRY_LIMIT_MB:.0f} MB a call carries")
    if total > CARRY_LIMIT_MB * 0.95:
        print("too close to the limit: a call would be refused", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
