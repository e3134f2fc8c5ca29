"""``make demo``: the main job on bundled defaults, with nothing but the repository.

1. Segments a phantom thigh with the bundled model and writes, under ``demo-out/``, the phantom,
   its segmentation as a Slicer ``.seg.nrrd``, per-muscle statistics and a preview PNG, and prints
   the Dice against the phantom's exact labels beside the model's confidence in each muscle, and
   the slices it was least sure on.
2. Fat fraction per muscle from a Dixon scan: a phantom calf's water and fat images (the same
   subject, fat infiltration drawn per muscle), segmented automatically on the water image; the
   table of measured against true fat fraction, right beside left, and ``leg_dixon_statistics.csv``.
3. The federated loop, on loopback: starts a server with a fresh data folder, creates a user per
   site; three sites each pull the calf model, segment a case from a domain the model has not
   seen (water-like contrast with fat infiltration), "correct" it (the phantom's exact labels
   stand in for the expert), fine-tune locally and push the weight delta; the server merges the
   three deltas (robust mean), checks the candidate on its validation phantoms and publishes it
   only if no Dice is lost; a site pulls the new version. Dice before and after is printed on a
   held-out case of the new domain. Then the server stops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from dafne_logic.core.io import write_labels
from dafne_logic.core.preview import write_preview
from dafne_logic.core.statistics import muscle_statistics, write_statistics_csv
from dafne_logic.inference.confidence import add_confidence_columns
from dafne_logic.inference.model_package import load_model
from dafne_logic.inference.segment import segment_volume, segment_with_confidence
from dafne_logic.learning.evaluation import dice_per_label, mean_dice
from dafne_logic.phantoms.images import make_dixon_phantom, make_phantom


def segment_demo(out: Path, region: str = "thigh", seed: int = 2024) -> float:
    """Segment one phantom; returns the mean Dice against its exact labels."""
    image, truth = make_phantom(region, shape=(20, 432, 432), contrast="t1", seed=seed)
    sitk.WriteImage(image, str(out / f"{region}_phantom.nii.gz"))
    model = load_model(region)
    print(f"model: {model.manifest.name} v{model.manifest.version} "
          f"(trained on {model.manifest.provenance.get('trained_on', 'unknown')})")
    started = time.perf_counter()
    labels, confidence = segment_with_confidence(
        image, model, progress=lambda f, m: print(f"\r  {100 * f:5.1f}% {m:<48}", end="", flush=True))
    print(f"\n  segmented {image.GetSize()} in {time.perf_counter() - started:.1f} s")
    write_labels(labels, out / f"{region}_phantom.seg.nrrd", model.labels)
    rows = muscle_statistics(image, labels, model.labels)
    add_confidence_columns(rows, confidence.per_label)
    write_statistics_csv(rows, out / f"{region}_statistics.csv")
    write_preview(image, labels, model.labels, out / f"{region}_preview.png", title=f"{region} phantom, seed {seed}")
    scores = dice_per_label(labels, truth, model.labels)
    values = {label.name: label.value for label in model.labels.volume_labels()}
    for name, dice in scores.items():
        sure = confidence.per_label.get(values[name])
        print(f"  {name:<36} Dice {dice:.3f}   model's confidence {'-' if sure is None else f'{sure:.2f}'}")
    least_sure = confidence.least_sure_slices(3)
    print(f"  mean Dice {mean_dice(scores):.3f}" + (f"; the model was least sure on slices {', '.join(map(str, least_sure))} "
                                                   "(where a user would start correcting)" if least_sure else ""))
    return mean_dice(scores)


def fat_fraction_demo(out: Path, region: str = "leg", seed: int = 31,
                      shape: tuple[int, int, int] = (12, 432, 432)) -> list[float]:
    """Per-muscle fat fraction of a phantom Dixon pair from its automatic segmentation, printed against
    the truth; returns the errors (measured − true, percentage points) of the muscles found."""
    from dafne_logic.core.quantitative import DEFAULT_ERODE_MM, fat_fraction_from_dixon

    pair = make_dixon_phantom(region, shape=shape, fat_infiltration=0.2, seed=seed)
    water, fat, truth = pair.water, pair.fat, pair.true_fat_fraction
    model = load_model(region)
    labels = segment_volume(water, model)
    rows = muscle_statistics(water, labels, model.labels, maps=[fat_fraction_from_dixon(water, fat, water)],
                             erode_mm=DEFAULT_ERODE_MM)
    write_statistics_csv(rows, out / f"{region}_dixon_statistics.csv")
    by_value = {row["label_value"]: row for row in rows}
    print(f"  fat fraction (%), mean over each muscle eroded by {DEFAULT_ERODE_MM:g} mm; measured (true)")
    print(f"  {'muscle':<30}{'right':>18}{'left':>18}")
    errors = []
    for i, muscle in enumerate(model.labels.muscles, start=1):
        cells = []
        for side in ("right", "left"):
            value = model.labels.value_of(i, side)
            measured = by_value[value]["fat_fraction_mean"]
            if measured is None or value not in truth:
                cells.append("not found")
                continue
            errors.append(measured - truth[value])
            cells.append(f"{measured:5.1f} ({truth[value]:5.1f})")
        print(f"  {muscle.name:<30}{cells[0]:>18}{cells[1]:>18}")
    worst = max(abs(e) for e in errors)
    print(f"  error against the truth: mean {sum(abs(e) for e in errors) / len(errors):.2f}, worst {worst:.2f} points")
    return errors


SITES = ("site-a", "site-b", "site-c")
SHIFTED_DOMAIN = {"contrast": "water", "fat_infiltration": 0.4, "noise": 0.05}


def _shifted_case(region: str, seed: int) -> tuple[sitk.Image, sitk.Image]:
    return make_phantom(region, shape=(8, 432, 432), seed=seed, **SHIFTED_DOMAIN)


def federated_demo(out: Path, region: str = "leg") -> tuple[float, float]:
    """The whole segment → correct → fine-tune → push → merge → pull loop; (Dice before, after)."""
    from dafne_logic.core.client_config import ClientConfig
    from dafne_logic.inference.model_package import ModelPackage
    from dafne_logic.learning.federated_client import FederatedClient
    from dafne_logic.learning.finetune import finetune_on_corrections
    from dafne_server.testing import run_local_server

    test_image, test_truth = _shifted_case(region, seed=7100)

    def held_out_dice(model: ModelPackage) -> float:
        return mean_dice(dice_per_label(segment_volume(test_image, model), test_truth, model.labels))

    data_dir = out / "server-data"
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    with run_local_server(data_dir, merge={"buffer_size": len(SITES)}) as server:
        print(f"  server on {server.url} (data in {data_dir}); merge buffer K = {len(SITES)}")
        update_ids = []
        before: float | None = None
        for i, site in enumerate(SITES):
            client = FederatedClient(ClientConfig(server.url, server.add_user(site), opt_in=True),
                                     downloads_dir=out / site / "downloads")
            model = ModelPackage.load(client.pull(region, "active", out / site / "models"))
            if before is None:
                before = held_out_dice(model)
                print(f"  pulled {region} v{model.manifest.version}; held-out Dice on the new domain: {before:.3f}")
            image, corrected = _shifted_case(region, seed=7000 + i)
            result = finetune_on_corrections(model, image, corrected, seed=i)
            folder = result.save(out / site / "finetuned")
            sent = client.push_folder(folder)
            update_ids.append((client, sent["id"]))
            print(f"  {site}: fine-tuned on {result.metadata.n_slices} slices "
                  f"(agreement automatic vs corrected {mean_dice(result.metadata.dice_per_label):.3f}), "
                  f"local held-out Dice {held_out_dice(result.model):.3f}; pushed "
                  f"{len(result.delta_bytes()) / 1e6:.2f} MB → update {sent['id']} {sent['status']}")
        for client, update_id in update_ids:
            info = client.wait_for_update(update_id, timeout_s=300)
            merged = f" into v{info['merged_into']}" if info.get("merged_into") else ""
            print(f"  update {update_id}: {info['status']}{merged} {info.get('reason') or ''}".rstrip())
        client = update_ids[0][0]
        latest = ModelPackage.load(client.pull(region, "active", out / "site-a" / "models"))
        after = held_out_dice(latest)
        assert before is not None  # SITES is not empty
        print(f"  active version now v{latest.manifest.version}; held-out Dice on the new domain: "
              f"{before:.3f} → {after:.3f}")
    return before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-out", help="folder for the demo's files")
    args = parser.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1. segment a phantom thigh with the bundled model")
    segment_demo(out)
    print("\n== 2. fat fraction per muscle from a phantom Dixon scan (water + fat images)")
    fat_fraction_demo(out)
    print("\n== 3. federated loop on loopback: three sites fine-tune on a new domain, the server merges")
    federated_demo(out)
    print(f"\nfiles in {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
