"""``dafne-slicer train``: a model from label maps (synthesised images) or from real image/label pairs.

Label maps (the base models)::

    dafne-slicer train --region thigh --label-maps DIR_OR_FILE... --output MODEL_DIR [--steps N] [--resume]

Real pairs, any region and label table (``NAME.nii.gz`` + ``NAME_labels.nii.gz``/``NAME.seg.nrrd``)::

    dafne-slicer train --label-table TABLE.json --pairs DIR... --output MODEL_DIR

Whole subjects given with ``--holdout-subjects`` never reach training; the validation Dice in the
log and the manifest is measured on them.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dafne_logic.core.atomic import check_replaceable
from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import BUILTIN_TABLES, LabelTable
from dafne_logic.core.numbers import strict_json
from dafne_logic.core.preprocessing import PreprocessingParams
from dafne_logic.inference.manifest import MANIFEST_NAME, Manifest
from dafne_logic.inference.model_package import PACKAGE_FOLDER
from dafne_logic.inference.networks import DEFAULT_UNET_KWARGS, unet_architecture

log = logging.getLogger(__name__)

# Per region: model spacing (mm), anatomy canvas and training crop (pixels), minimum classes per slice.
REGION_DEFAULTS: dict[str, dict[str, Any]] = {
    "thigh": {"spacing": 1.25, "canvas": 224, "size": 176, "min_classes": 3},
    "leg": {"spacing": 1.0, "canvas": 192, "size": 160, "min_classes": 2},
}
GENERIC_DEFAULTS = {"spacing": 1.0, "canvas": 224, "size": 176, "min_classes": 1}

# The data behind a model, named with its licence as the model cards credit it: one entry per
# shared-data folder (matched in the label-map paths), written to provenance.training.data_sources.
DATA_SOURCES: dict[str, dict[str, str]] = {
    "calf_slices": {
        "name": "dafne-evaluation calf slices",
        "url": "https://github.com/dafne-imaging/dafne-evaluation",
        "licence": "Apache-2.0",
        "used": "manual calf label maps as anatomy; their images are never used for training"},
    "thigh_label_maps": {
        "name": "Multimodal-Multiethnic-Thigh-Muscle-MRI-analysis thigh label maps",
        "url": "https://github.com/Hirriririir/Multimodal-Multiethnic-Thigh-Muscle-MRI-analysis",
        "licence": "Apache-2.0",
        "used": "anatomy (label maps, SegResNet predictions); no images"},
    "lowerbody_label_maps": {
        "name": "MuscleMap lower-body label maps",
        "url": "https://github.com/MuscleMap/MuscleMap",
        "licence": "MIT",
        "used": "anatomy (label maps, model predictions); coarse calf labels through the partial-label loss"},
    "visible_human_label_maps": {
        "name": "Visible Human Male and Female lower-limb geometry (Andreassen et al., Sci Data 2022, "
                "doi:10.1038/s41597-022-01905-2)",
        "url": "https://doi.org/10.56902/COB.vh.2022.0",
        "licence": "CC BY 4.0",
        "used": "anatomy (label maps voxelised from the surface meshes; re-oriented to LPS); no images"},
}
PHANTOM_SOURCE = {"name": "dafne_logic.phantoms", "licence": "Apache-2.0 (generated)", "used": "anatomy"}


def data_sources(files: list[Path], phantoms: bool) -> list[dict[str, str]]:
    """The :data:`DATA_SOURCES` entries whose folder names one of ``files``, plus the phantoms if used."""
    used = [dict(entry) for key, entry in DATA_SOURCES.items() if any(key in str(path) for path in files)]
    return used + ([dict(PHANTOM_SOURCE)] if phantoms else [])


def pair_sources(folders: list[Path]) -> list[dict[str, str]]:
    """The sources of a ``--pairs`` run: each folder by its path, and the :data:`DATA_SOURCES` entry
    (licence, address) of a shared-data folder among them, saying that its images were used."""
    named = [{"name": f"image/label pairs in {folder}", "used": "real images and their label maps"} for folder in folders]
    known = [{**entry, "used": "real images and their label maps as training pairs"} for entry in data_sources(folders, False)]
    return named + known


def source_list(recorded: Any) -> list[dict[str, str]]:
    """A manifest's recorded sources as entries: today's list, or the folder → text dict that
    manifests before the list held (known folders become their :data:`DATA_SOURCES` entry)."""
    if isinstance(recorded, dict):
        return [dict(DATA_SOURCES[key]) if key in DATA_SOURCES else {"name": str(key), "used": str(text)}
                for key, text in recorded.items()]
    if isinstance(recorded, list):
        return [{k: str(v) for k, v in entry.items()} for entry in recorded
                if isinstance(entry, dict) and entry.get("name")]
    return []


def merge_sources(*lists: list[dict[str, str]]) -> list[dict[str, str]]:
    """Several source lists as one, each source (by name) once, in first-seen order."""
    merged: dict[str, dict[str, str]] = {}
    for entries in lists:
        for entry in entries:
            merged.setdefault(entry["name"], entry)
    return list(merged.values())


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to learn from")
    source.add_argument("--region", choices=sorted(BUILTIN_TABLES), help="built-in label table (thigh or leg)")
    source.add_argument("--label-table", metavar="JSON", help="a label table for new anatomy (with --pairs)")
    source.add_argument("--label-maps", nargs="+", type=Path, metavar="PATH",
                        help="label map files or folders: images are synthesised from them")
    source.add_argument("--pairs", nargs="+", type=Path, metavar="DIR",
                        help="folders of real image/label pairs (NAME.nii.gz with NAME_labels.nii.gz or NAME.seg.nrrd)")
    source.add_argument("--phantoms", type=int, default=0, metavar="N",
                        help="add N procedural phantom subjects as anatomy (built-in regions)")
    source.add_argument("--phantom-share", type=float, default=0.3, metavar="FRACTION",
                        help="fraction of training samples drawn from the phantoms (default 0.3); each label "
                             "map weighs the same in the rest")
    source.add_argument("--source-weights", nargs="+", default=[], metavar="NAME=WEIGHT",
                        help="weigh the label maps whose file name contains NAME by WEIGHT (default 1 each), "
                             "e.g. VHM_legs=0.6 VHF_legs=0.6 to lower the cadaver calves' share")
    source.add_argument("--holdout-subjects", nargs="*", default=[], metavar="ID",
                        help="subjects (e.g. THIGH_003) kept out of training and used for validation")
    parser.add_argument("--output", "-o", required=True, type=Path, help="model package folder to write")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and logs (default OUTPUT.training)")
    parser.add_argument("--name", help="model name in the manifest (default: the output folder's name)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--init", type=Path, metavar="MODEL_DIR",
                        help="start from this model package's weights (same architecture and labels) instead "
                             "of random ones, e.g. to train a shipped model longer")
    train = parser.add_argument_group("schedule")
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (mixed precision on CUDA)")
    train.add_argument("--checkpoint-every", type=int, default=200)
    train.add_argument("--val-every", type=int, default=500)
    train.add_argument("--spacing", type=float, help="model in-plane spacing in mm (region default)")
    train.add_argument("--size", type=int, help="training crop side in pixels (region default)")
    train.add_argument("--synthesis", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="change a range of the image synthesis (SynthesisConfig; JSON values), e.g. "
                            "p_infiltration=0.5 'infiltration_affected=[0.5,1.0]'; recorded in the manifest")
    train.add_argument("--time-limit", type=float, metavar="MINUTES",
                       help="end within this wall time (counted from the command's start): the schedule is fitted "
                            "to it from the measured step time (at most --steps); the steps done are recorded "
                            "in the manifest")
    train.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def _table(args: argparse.Namespace) -> LabelTable:
    if args.region and args.label_table:
        raise InputError("give either --region or --label-table, not both")
    if args.label_table:
        try:
            return LabelTable.load(args.label_table)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{args.label_table}: not a usable label table ({exc})") from exc
    if args.region:
        return BUILTIN_TABLES[args.region]
    raise InputError("say which labels to learn: --region thigh|leg or --label-table TABLE.json")


def _command_line(args: argparse.Namespace) -> str:
    """The ``dafne-slicer train`` command that reproduces this run (paths as given)."""
    words = ["dafne-slicer", "train"]
    for key, value in vars(args).items():
        if key in ("func", "command", "verbose", "no_progress", "resume") or value in (None, False, []):
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _initial_weights(path: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The weights of the package at ``path``, checked to fit ``manifest`` (architecture and labels);
    the new manifest records where they came from."""
    from dafne_logic.inference.model_package import ModelPackage

    parent = ModelPackage.load(path)
    if parent.manifest.architecture != manifest.architecture:
        raise InputError(f"{path}: its architecture {parent.manifest.architecture} differs from the one trained "
                         f"here {manifest.architecture}")
    if [m.name for m in parent.labels.muscles] != [m.name for m in manifest.labels.muscles]:
        raise InputError(f"{path}: its labels differ from the {manifest.labels.region} label table trained here")
    training = manifest.provenance["training"]
    training["initialised_from"] = {
        "name": parent.manifest.name, "version": parent.manifest.version,
        "weights_sha256": parent.manifest.weights_sha256}
    # The parent's weights carry what it learnt from: its sources stay credited.
    inherited = source_list(parent.manifest.provenance.get("training", {}).get("data_sources"))
    training["data_sources"] = merge_sources(training.get("data_sources", []), inherited)
    return parent.state_dict


DATA_NAME = "data.json"  # in the work folder: what a run trains on, which a resumed run must not change


def check_resumed_data(work_dir: Path, summary: dict[str, Any], resume: bool) -> None:
    """Record what the run trains on (subjects, held-out subjects, source weights, synthesis,
    slices; file names, not paths) in ``work_dir/data.json``; a resumed run must train on the
    same, or its manifest would describe data its weights did not see (a subject "held out" that
    the first part trained on). A work folder from before this record is resumed unchecked.

    Raises:
        InputError: ``resume`` and a recorded description that differs.
    """
    import json

    from dafne_logic.core.atomic import atomic_write_text

    described = {k: v for k, v in summary.items() if k not in ("label_maps", "pairs", "data_sources")}
    for key in ("label_maps", "pairs"):
        if key in summary:
            described[f"{key}_files"] = sorted(Path(p).name for p in summary[key])
    text = json.dumps(strict_json(described), sort_keys=True, indent=1) + "\n"
    path = work_dir / DATA_NAME
    if resume and path.is_file():
        recorded, now = json.loads(path.read_text(encoding="utf-8")), json.loads(text)
        if "initialised_from" not in recorded:  # a record from before the field: that part cannot be checked
            now.pop("initialised_from", None)
        if recorded != now:
            raise InputError(f"{work_dir}: the run being resumed trained on other data or started from another model "
                             "(label maps, held-out subjects, source weights, phantoms, synthesis ranges or --init); "
                             "resume with the same options or start a new run")
    if not resume:  # a new run: an earlier run's checkpoint would otherwise be resumed under this run's description
        import shutil

        from dafne_logic.training.trainer import CHECKPOINT_DIR

        if (work_dir / CHECKPOINT_DIR).exists():
            log.warning("%s: starting a new run; the earlier run's checkpoint is removed", work_dir)
            shutil.rmtree(work_dir / CHECKPOINT_DIR)
    atomic_write_text(path, text)


def _source_weights(files: list[Path], specs: list[str]) -> list[float]:
    """Relative weight of each label map from ``NAME=WEIGHT`` specs (first match; 1 otherwise).

    Raises:
        InputError: a spec that is not NAME=positive number, or a NAME that matches no file."""
    rules = []
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not name or not weight > 0 or not math.isfinite(weight):
            raise InputError(f"--source-weights {spec!r}: write NAME=WEIGHT with a positive weight")
        if not any(name in f.name for f in files):
            raise InputError(f"--source-weights {spec!r}: no label map's file name contains {name!r}")
        rules.append((name, weight))
    first_match = [next((i for i, (name, _) in enumerate(rules) if name in f.name), None) for f in files]
    for i, spec in enumerate(specs):
        if i not in first_match:  # e.g. THIGH_02=2 before THIGH_022=0: the second would silently do nothing
            raise InputError(f"--source-weights {spec!r}: every label map it names takes an earlier spec's weight; "
                             "put the more specific name first")
    return [1.0 if i is None else rules[i][1] for i in first_match]


def _split(sources: list[list[Any]], holdout: set[str]) -> tuple[list[list[Any]], list[list[Any]]]:
    train = [s for s in sources if s and s[0].subject not in holdout]
    held = [s for s in sources if s and s[0].subject in holdout]
    return train, held


def run(args: argparse.Namespace) -> int:
    from dafne_logic.training.trainer import TrainConfig, default_work_dir, train_model

    began = time.monotonic()
    table = _table(args)
    if not args.label_maps and not args.pairs and not args.phantoms:
        raise InputError("nothing to learn from: give --label-maps, --pairs or --phantoms")
    defaults = REGION_DEFAULTS.get(table.region, GENERIC_DEFAULTS)
    spacing = defaults["spacing"] if args.spacing is None else args.spacing
    size = defaults["size"] if args.size is None else args.size
    if not (math.isfinite(spacing) and 0.05 <= spacing <= 20):
        raise InputError(f"--spacing must be a pixel size from 0.05 to 20 mm, not {spacing}")
    stride = math.prod(DEFAULT_UNET_KWARGS["strides"])  # the network halves the crop this often
    if size < 2 * stride or size % stride:
        raise InputError(f"--size must be a multiple of {stride} pixels, at least {2 * stride}, not {size}")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise InputError(f"--time-limit must be a positive number of minutes, not {args.time_limit}")
    if args.time_limit is not None and args.resume:
        raise InputError("--time-limit cannot be combined with --resume: give the total number of steps with --steps")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, checkpoint_every=args.checkpoint_every, val_every=args.val_every)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device
    device = "cpu" if device == "auto" else device
    params = PreprocessingParams(spacing_mm=(spacing, spacing))
    holdout = set(args.holdout_subjects)
    from dafne_logic.training.synthesis import synthesis_overrides

    try:  # before any data is read: a typo costs nothing
        changes = synthesis_overrides(list(args.synthesis))
    except ValueError as error:
        raise InputError(str(error)) from None
    check_replaceable(args.output, MANIFEST_NAME, PACKAGE_FOLDER)  # not a scan folder or a file, found after hours

    if args.pairs:
        sampler, validate, loss_fn, summary = _pairs_setup(args, table, params, size, holdout, device, changes)
    else:
        sampler, validate, loss_fn, summary = _label_map_setup(args, table, spacing, size, defaults, holdout, device, changes)

    manifest = Manifest(
        name=args.name or args.output.name,
        region=table.region,
        version="1",
        architecture=unet_architecture(table.n_classes),
        labels=table,
        preprocessing=params,
        provenance={
            "trained_on": summary["trained_on"],
            "training": {"command": _command_line(args),
                         **{k: v for k, v in summary.items() if k != "trained_on"}},
        },
    )
    bar = None if args.no_progress else tqdm(total=config.steps, unit="step", desc="training")

    def progress(done: int, total: int, info: dict[str, float]) -> None:
        if bar is not None:
            bar.n, bar.total = done, total  # a time limit may shorten the run
            bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)
            bar.refresh()

    # --init is checked before check_resumed_data removes an earlier run's checkpoint for a new run.
    init_state = _initial_weights(args.init, manifest) if args.init else None
    # Part of what a resumed run must share: its weights came from that model (or from none).
    summary = {**summary, "initialised_from": manifest.provenance["training"].get("initialised_from")}
    check_resumed_data(Path(args.work_dir) if args.work_dir else default_work_dir(args.output), summary, args.resume)
    if args.time_limit is not None:  # the limit counts from the command's start: reading the data is part of it
        left = args.time_limit * 60.0 - (time.monotonic() - began)
        if left <= 0:
            raise InputError(f"reading the training data took longer than --time-limit {args.time_limit:g} minutes")
        config = replace(config, time_limit_s=left)
    try:
        package = train_model(manifest, sampler, config, args.output, progress=progress, validate=validate,
                              resume=args.resume, init_state=init_state, loss_fn=loss_fn, work_dir=args.work_dir)
    finally:
        if bar is not None:
            bar.close()
    final = package.manifest.provenance["training"].get("final_validation") or {}
    print(f"model written to {args.output} (checkpoints and log in {args.work_dir or default_work_dir(args.output)})")
    if final:
        print(f"validation mean Dice {final.get('mean_dice', float('nan')):.3f} on held-out subjects")
    return 0


def _label_map_setup(args: argparse.Namespace, table: LabelTable, spacing: float, size: int,
                     defaults: dict[str, Any], holdout: set[str], device: str, changes: dict[str, Any]):
    from dafne_logic.training.harmonisation import GroupRegistry, PartialLabelLoss, find_label_maps, load_label_map, phantom_leg_slices
    from dafne_logic.training.samplers import AnatomyBank, SynthesisSampler
    from dafne_logic.training.synthesis import SynthesisConfig
    from dafne_logic.training.synthetic_validation import synthetic_validation

    canvas = (defaults["canvas"], defaults["canvas"])
    registry = GroupRegistry(table.n_classes)
    files = find_label_maps(list(args.label_maps)) if args.label_maps else []
    sources = [load_label_map(path, table, registry, spacing, canvas, defaults["min_classes"]) for path in files]
    relative = _source_weights(files, list(args.source_weights))
    phantoms = []
    if args.phantoms:
        if table.region not in BUILTIN_TABLES:
            raise InputError("--phantoms needs a built-in region (thigh or leg)")
        if not 0 < args.phantom_share <= 1:
            raise InputError("--phantom-share must lie in (0, 1]")
        phantoms = phantom_leg_slices(table, args.phantoms, 1000 + args.seed, spacing, canvas)
    unknown = holdout - {s[0].subject for s in sources + phantoms if s}
    if unknown:
        raise InputError(f"held-out subjects {sorted(unknown)} are in none of the label maps")
    train_pairs = [(s, w) for s, w in zip(sources, relative, strict=True) if s and s[0].subject not in holdout]
    train = [s for s, _ in train_pairs]
    held = [s for s in sources if s and s[0].subject in holdout]
    train_phantoms, held_phantoms = _split(phantoms, holdout)
    held += held_phantoms
    if not train and not train_phantoms:
        raise InputError("no usable training slices in the label maps (every case is empty, held out or "
                         "has too few muscles of the table)")
    # Each label map weighs the same (or its --source-weights share); the phantoms together take
    # --phantom-share of the samples.
    phantom_share = args.phantom_share if train else 1.0
    total = sum(w for _, w in train_pairs)
    weights = [((1 - phantom_share) if train_phantoms else 1.0) * w / total for _, w in train_pairs]
    weights += [phantom_share / len(train_phantoms)] * len(train_phantoms) if train_phantoms else []
    train += train_phantoms
    bank = AnatomyBank.from_sources(train, source_weights=weights)
    synth = SynthesisConfig(size=(size, size), spacing_mm=spacing, **changes)
    sampler = SynthesisSampler(bank, synth, device)
    validate = None
    if held:
        # Muscles no held-out slice labels (the adductor longus of the 11-label maps) get no figure.
        labelled = set(torch.cat([torch.from_numpy(s.target).unique() for source in held for s in source]).tolist())
        unlabelled = frozenset(range(1, table.n_classes)) - labelled
        validate = synthetic_validation(AnatomyBank.from_sources(held), synth, [m.name for m in table.muscles],
                                        samples=48, device=device, unlabelled=unlabelled)
    summary = {
        "trained_on": "images synthesised from real label maps" + (" and phantoms" if args.phantoms else ""),
        "label_maps": [str(p) for p in files],
        "phantom_subjects": args.phantoms,
        "phantom_share": args.phantom_share if train_phantoms else 0.0,
        "source_weights": [[s[0].subject, round(w, 6)] for s, w in zip(train, weights, strict=True)],
        "training_subjects": sorted({s[0].subject for s in train}),
        "holdout_subjects": sorted(holdout),
        "training_slices": len(bank),
        "partial_label_groups": [sorted(g) for g in registry.groups],
        "synthesis": strict_json(asdict(synth)),  # every range, so a recipe is known after defaults change
        "data_sources": data_sources(files, bool(train_phantoms)),
    }
    log.info("training on %d leg slices of %d sources; groups %s", len(bank), len(train), registry.groups)
    return sampler, validate, PartialLabelLoss(table.n_classes, registry.groups), summary


def _pairs_setup(args: argparse.Namespace, table: LabelTable, params: PreprocessingParams, size: int,
                 holdout: set[str], device: str, changes: dict[str, Any]):
    from dafne_logic.core.io import read_image, read_segmentation
    from dafne_logic.core.preprocessing import prepare_volume
    from dafne_logic.training.harmonisation import subject_id
    from dafne_logic.training.samplers import SliceSampler
    from dafne_logic.training.synthesis import SynthesisConfig
    from dafne_logic.training.synthetic_validation import dice_by_class

    cases = []
    for folder in args.pairs:
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder of image/label pairs")
        for label_path in sorted(folder.iterdir()):
            name = label_path.name
            if name.endswith(".seg.nrrd"):
                stem = name[: -len(".seg.nrrd")]
            elif "_labels." in name and not name.endswith(".json"):
                stem = name.split("_labels.")[0]
            else:
                continue
            images = [p for p in folder.iterdir() if p != label_path and p.name.split(".")[0] == stem
                      and not p.name.endswith((".json", ".seg.nrrd"))]
            if not images:
                raise InputError(f"{label_path}: no image named {stem}.* beside it")
            cases.append((images[0], label_path))
    if not cases:
        raise InputError(f"no image/label pairs in {', '.join(map(str, args.pairs))}")
    unknown = holdout - {subject_id(image_path) for image_path, _ in cases}
    if unknown:  # a misspelled subject would be trained on while the manifest says it was held out
        raise InputError(f"held-out subjects {sorted(unknown)} are in none of the pairs")
    train_slices: list[list[Any]] = []
    held_slices: list[list[Any]] = []
    for image_path, label_path in cases:
        labels, unknown = read_segmentation(label_path, table)
        if unknown:
            raise InputError(f"{label_path}: labels {unknown[:4]} are not in the {table.region} label table")
        prepared = prepare_volume(read_image(image_path), params, labels, table)
        crops = [(leg.image, leg.target) for leg in prepared.legs]
        (held_slices if subject_id(image_path) in holdout else train_slices).append(crops)
    if not train_slices:
        raise InputError("every pair is held out; nothing left to train on")
    synth = SynthesisConfig(size=(size, size), **changes)
    sampler = SliceSampler([c for case in train_slices for c in case], synth, device)
    validate = None
    if held_slices:
        held = [c for case in held_slices for c in case]

        def validate(network: torch.nn.Module) -> dict[str, float]:
            predictions, targets = [], []
            with torch.no_grad():
                for image, target in held:
                    x = torch.from_numpy(image[:, None]).to(next(network.parameters()).device)
                    predictions.append(network(x).argmax(1).cpu().flatten())
                    targets.append(torch.from_numpy(target.astype("int64")).flatten())
            scores = dice_by_class(torch.cat(predictions), torch.cat(targets), table.n_classes)
            result = {m.name: float(s) for m, s in zip(table.muscles, scores, strict=True)}
            valid = scores[~torch.isnan(scores)]
            result["mean_dice"] = float(valid.mean()) if valid.numel() else float("nan")
            return result

    summary = {"trained_on": "real image/label pairs", "pairs": [str(c[1]) for c in cases],
               "holdout_subjects": sorted(holdout),
               "synthesis": strict_json(asdict(synth)),  # the augmentation ranges the real slices went through
               "data_sources": pair_sources(list(args.pairs))}
    return sampler, validate, None, summary
