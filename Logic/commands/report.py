"""``dafne-slicer report``: learning-curve mixed model from an ``evaluate`` Dice table.

Versions are ordered by lineage: the parent chain of the model manifests (the registry's models,
or the folders given with ``--models``), so local fine-tunes (``3.local-<hash>``) follow their
parents, not the order of their hashes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dafne_logic.commands.output_paths import check_outputs
from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.core.errors import InputError
from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve, read_dice_csv


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dice-csv", required=True, metavar="FILE",
                        help="CSV with columns dataset,model_version,dice (as written by 'evaluate')")
    parser.add_argument("--from", dest="from_version", metavar="VERSION", help="first version of the window")
    parser.add_argument("--to", dest="to_version", metavar="VERSION", help="last version of the window")
    parser.add_argument("--models", nargs="+", type=Path, metavar="DIR",
                        help="model folders (or folders of them) whose manifests give the versions' parent chain "
                             "(default: every model in the registry)")
    parser.add_argument("--family", metavar="NAME", help="only manifests of this model name give the lineage")
    parser.add_argument("--json", metavar="OUT", help="write the fit as JSON")
    parser.add_argument("--plot", metavar="PNG", help="plot per-dataset relative Dice, their mean and the fit")
    parser.set_defaults(func=run)


def version_parents(folders: list[Path] | None, family: str | None = None) -> dict[str, str | None]:
    """Version → parent version from model manifests: those in ``folders`` (a package folder, or a
    folder of packages), or every registry model when ``folders`` is None.

    Raises:
        InputError: a folder without model packages, or one version given two different parents
            (models of several families: name one with ``family``).
        ModelError: an unreadable manifest in ``folders``.
    """
    from dafne_logic.inference.manifest import MANIFEST_NAME, list_models, read_manifest

    if folders is None:
        manifests = [entry.manifest for entry in list_models()]
    else:
        manifests = []
        for folder in folders:
            packages = [folder] if (folder / MANIFEST_NAME).is_file() else sorted(
                p for p in (folder.iterdir() if folder.is_dir() else []) if (p / MANIFEST_NAME).is_file())
            if not packages:
                raise InputError(f"{folder} is neither a model folder nor a folder of model folders")
            manifests += [read_manifest(p) for p in packages]  # a broken manifest: ModelError, one sentence
    parents: dict[str, str | None] = {}
    for manifest in manifests:
        if family is not None and manifest.name != family:
            continue
        known = parents.setdefault(manifest.version, manifest.parent_version)
        if known != manifest.parent_version:
            raise InputError(f"version {manifest.version} has two parents in the manifests ({known} and "
                             f"{manifest.parent_version}); name the model with --family")
    return parents


def run(args: argparse.Namespace) -> int:
    check_outputs([("--json", args.json), ("--plot", args.plot)], [args.dice_csv, *(args.models or [])])
    table = read_dice_csv(args.dice_csv)
    parents = version_parents(args.models, args.family)
    data = prepare_learning_curve(table, args.from_version, args.to_version, parents)
    fit = fit_learning_curve(data)
    print(fit.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(fit.to_json(), indent=2) + "\n")
    if args.plot:
        plot_learning_curve(data, fit, args.plot)
    return 0
