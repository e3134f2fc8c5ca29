"""Fine-tuning on corrections: learning, lineage and delta, slice selection, determinism, bad input.

The volumes are small synthetic two-leg stacks (six calf "muscles" as sectors of a disc, each
with its own intensity) and the model a tiny U-Net, so each fine-tune takes about a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dafne_logic.core.errors import Cancelled, InputError
from dafne_logic.core.labels import LEG, LabelTable
from dafne_logic.core.preprocessing import PreprocessingParams
from dafne_logic.core.slice_selection import min_muscles_required, parse_slice_list, select_slices
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.model_package import ModelPackage
from dafne_logic.inference.networks import build_network, unet_architecture
from dafne_logic.learning.delta import DELTA_METADATA_NAME, DELTA_NAME, DeltaMetadata, apply_delta, decode_delta
from dafne_logic.learning.finetune import FinetuneConfig, finetune_on_corrections
from dafne_logic.learning.finetune_loop import augment, is_unet_decoder
from dafne_logic.learning.finetune_slices import TrainingSlices, split_holdout

FAST = FinetuneConfig(lr=1e-2, prox_mu=0.0, max_epochs=10)


def two_legs(n_slices: int = 6, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """(image, volume labels): two discs (legs) at 2 mm, each with six muscle sectors.

    Patient right is at low x (LPS identity direction); the left leg is the mirror image, so the
    network sees the same anatomy on both sides after the preprocessing mirrors the left leg.
    """
    rng = np.random.default_rng(seed)
    h, w = 64, 128
    image = np.zeros((n_slices, h, w), np.float32)
    labels = np.zeros((n_slices, h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for side, cx in (("right", 32), ("left", 96)):
        dx = (xx - cx) * (1 if side == "right" else -1)
        radius = np.hypot(dx, yy - 32)
        sector = np.minimum(((np.arctan2(yy - 32, dx) + np.pi) / (2 * np.pi) * 6).astype(int), 5) + 1
        for k in range(n_slices):
            outer = 24 - 0.5 * k
            muscle = (radius >= 6) & (radius < outer - 2)
            image[k][radius < outer] = 250.0  # subcutaneous fat
            image[k][muscle] = 60.0 + 25.0 * sector[muscle]
            image[k][radius < 6] = 400.0  # bone marrow
            for i in range(1, LEG.n_muscles + 1):
                labels[k][muscle & (sector == i)] = LEG.value_of(i, side)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((2.0, 2.0, 5.0))
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    return img, lab


# The calf muscles under another region name: no phantom replay (fast); see test_phantom_replay.
TINY_CALF = LabelTable("tiny calf", LEG.muscles)


def tiny_model(seed: int = 0, version: str = "1", table: LabelTable = TINY_CALF) -> ModelPackage:
    """An untrained 3-level U-Net for the calf muscles, preprocessing at 2 mm."""
    torch.manual_seed(seed)
    arch = unet_architecture(LEG.n_classes, {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    manifest = Manifest(name="leg", region="leg", version=version, architecture=arch, labels=table,
                        preprocessing=PreprocessingParams(spacing_mm=(2.0, 2.0)),
                        provenance={"trained_on": "nothing (test)"})
    return ModelPackage(manifest, {k: v.detach().clone() for k, v in build_network(arch).state_dict().items()})


def saved_tiny_model(folder: Path) -> ModelPackage:
    tiny_model().save(folder)
    return ModelPackage.load(folder)


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def with_array(like: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like)
    return out


def test_report_gives_dice_on_held_out_slices_apart_from_the_trained_ones(tmp_path):
    parent = saved_tiny_model(tmp_path / "parent")
    image, labels = two_legs()
    report = finetune_on_corrections(parent, image, labels, config=FAST).report

    held = [tuple(pair) for pair in report["leg_slices"]]
    held = [held[i] for i in split_holdout(held, FAST)[1]]
    assert len(held) == report["n_held_out"] == 2
    assert {side for side, _ in held} == {"right", "left"} and len({z for _, z in held}) == 1  # one image slice, both legs
    # the held-out Dice is measured on those slices only: its labels are those drawn there
    drawn_on_held = {name for name in report["dice_before"] if name.split()[0] in {side for side, _ in held}}
    assert set(report["dice_held_out_before"]) <= drawn_on_held
    assert report["dice_held_out_before"] and report["dice_held_out_after"]
    assert report["mean_dice_held_out_after"] > report["mean_dice_held_out_before"]
    assert report["dice_held_out_after"] != report["dice_after"]

    few = finetune_on_corrections(parent, image, labels, slices=[0, 1], config=FAST).report
    assert few["n_held_out"] == 0 and few["dice_held_out_after"] is None and few["mean_dice_held_out_after"] is None


def test_finetune_learns_and_saves_lineage_and_delta(tmp_path):
    parent = saved_tiny_model(tmp_path / "parent")
    before = folder_digest(tmp_path / "parent")
    image, labels = two_legs()
    result = finetune_on_corrections(parent, image, labels, config=FAST)

    report = result.report
    assert report["n_leg_slices"] == 12 and report["n_slices"] == 6 and report["n_held_out"] == 2
    assert report["mean_dice_after"] > report["mean_dice_before"] + 0.4
    assert report["mean_dice_after"] > 0.7
    # agreement of the automatic (parent) segmentation, per volume label, travels with the delta
    assert set(result.metadata.dice_per_label) == {lab.name for lab in LEG.volume_labels()}
    assert report["n_replay_slices"] == 0  # no phantoms for a table that is not built in
    assert result.metadata.dice_per_label == report["dice_before"]
    assert result.metadata.parent_version == "1" and result.metadata.n_slices == 6

    out = result.save(tmp_path / "child")
    assert folder_digest(tmp_path / "parent") == before  # parent untouched
    child = ModelPackage.load(out)
    assert child.manifest.parent_version == "1"
    assert child.manifest.version.startswith("1.local-") and len(child.manifest.version) == len("1.local-") + 8
    assert child.manifest.provenance["finetune"]["n_slices"] == 6
    for k, v in child.state_dict.items():
        assert torch.equal(v, result.model.state_dict[k])  # in memory == on disk (fp16-rounded)

    # the delta applied to the parent reproduces the child within fp16 tolerance
    delta = decode_delta((out / DELTA_NAME).read_bytes(), parent.manifest)
    rebuilt = apply_delta(parent.state_dict, delta)
    changed = 0
    for k, v in child.state_dict.items():
        assert torch.allclose(rebuilt[k], v, rtol=2e-3, atol=2e-3), k
        changed += int(not torch.equal(v, parent.state_dict[k]))
    assert changed > len(child.state_dict) // 2
    meta = json.loads((out / DELTA_METADATA_NAME).read_text())
    assert meta == DeltaMetadata(**meta).to_json() and meta["family"] == "leg"

    # the saved child predicts the training slices better than the parent, via the full pipeline
    from dafne_logic.inference.segment import segment_volume
    from dafne_logic.learning.evaluation import dice_per_label, mean_dice

    dice_parent = mean_dice(dice_per_label(segment_volume(image, parent, device="cpu"), labels, LEG))
    dice_child = mean_dice(dice_per_label(segment_volume(image, child, device="cpu"), labels, LEG))
    assert dice_child > dice_parent + 0.4


def test_same_seed_same_weights_other_seed_differs():
    image, labels = two_legs(n_slices=3)
    config = FinetuneConfig(lr=1e-2, prox_mu=0.01, max_epochs=2)
    a = finetune_on_corrections(tiny_model(), image, labels, seed=5, config=config)
    b = finetune_on_corrections(tiny_model(), image, labels, seed=5, config=config)
    c = finetune_on_corrections(tiny_model(), image, labels, seed=6, config=config)
    assert a.model.manifest.version == b.model.manifest.version != c.model.manifest.version
    assert all(torch.equal(a.model.state_dict[k], b.model.state_dict[k]) for k in a.model.state_dict)


def test_proximal_term_keeps_weights_closer_to_the_parent():
    image, labels = two_legs(n_slices=3)
    free = finetune_on_corrections(tiny_model(), image, labels, config=FinetuneConfig(lr=1e-2, prox_mu=0.0, max_epochs=2))
    held = finetune_on_corrections(tiny_model(), image, labels, config=FinetuneConfig(lr=1e-2, prox_mu=5.0, max_epochs=2))
    assert held.report["delta_norm"] < 0.8 * free.report["delta_norm"]


def test_decoder_only_fine_tuning_keeps_the_encoder_and_bottleneck():
    """``trainable="decoder"``: the up-sampling path moves, every other weight stays the parent's."""
    image, labels = two_legs(n_slices=3)
    parent = tiny_model()
    result = finetune_on_corrections(parent, image, labels, config=FinetuneConfig(lr=1e-2, max_epochs=2, trainable="decoder"))
    # The child is stored in fp16: a weight that did not move equals the parent's, rounded to fp16.
    moved = {name for name, weight in result.model.state_dict.items()
             if not torch.equal(weight.float(), parent.state_dict[name].half().float())}
    learnable = {name for name, _ in parent.network("cpu").named_parameters()}
    decoder = {name for name in learnable if is_unet_decoder(name)}
    assert decoder and moved & learnable and (moved & learnable) <= decoder  # only decoder parameters moved
    assert "model.0.conv.unit0.conv.weight" in learnable - decoder  # the first down layer is frozen
    assert "model.2.1.conv.unit0.conv.weight" in decoder  # the last up layer learns
    with pytest.raises(InputError, match="trainable must be one of"):
        FinetuneConfig(trainable="encoder")


def test_replay_pools_are_rehearsed():
    image, labels = two_legs(n_slices=2)
    config = FinetuneConfig(max_epochs=1, replay_cases=1, replay_slices=1)
    # phantoms of the model's region (the built-in calf table), cropped to the correction's crop size
    calf = finetune_on_corrections(tiny_model(table=LEG), image, labels, config=config)
    assert calf.report["n_replay_slices"] == 12  # 6 contrasts x 1 slice x 2 legs
    assert calf.model.manifest.provenance["finetune"]["n_replay_slices"] == 12
    # a caller's pool; pulling towards an all-background pool changes the result
    pool = TrainingSlices(torch.zeros(3, 1, 64, 64), torch.zeros(3, 64, 64, dtype=torch.long), [("pool", i) for i in range(3)])
    own = finetune_on_corrections(tiny_model(), image, labels, config=config, replay=pool)
    none = finetune_on_corrections(tiny_model(), image, labels, config=config, replay=None)
    assert own.report["n_replay_slices"] == 3 and none.report["n_replay_slices"] == 0
    assert own.model.manifest.version != none.model.manifest.version
    with pytest.raises(InputError, match="replay"):
        finetune_on_corrections(tiny_model(), image, labels, config=config, replay="everything")


def test_automatic_selection_uses_slices_with_most_muscles_per_leg():
    assert (min_muscles_required(12), min_muscles_required(6)) == (7, 4)
    target = np.zeros((4, 8, 8), np.uint8)
    target[0, 0, :7] = np.arange(1, 8)  # 7 of 12 drawn
    target[1, 0, :6] = np.arange(1, 7)  # 6 of 12: not enough
    target[3, :, :] = 12  # one muscle, many voxels
    assert select_slices(target, 12) == [0]
    assert select_slices(target, 12, min_muscles=1) == [0, 1, 3]

    image, labels = two_legs()
    array = sitk.GetArrayFromImage(labels)
    right = (array >= 1) & (array <= 6)
    # right leg: slice 3 keeps only 3 muscles (below 4 of 6); left leg: only slices 4 and 5 drawn
    array[3][right[3] & (array[3] > 3)] = 0
    array[:4][array[:4] > 6] = 0
    result = finetune_on_corrections(tiny_model(), image, with_array(labels, array),
                                     config=FinetuneConfig(max_epochs=1))
    assert sorted(map(tuple, result.report["leg_slices"])) == sorted(
        [("right", 0), ("right", 1), ("right", 2), ("right", 4), ("right", 5), ("left", 4), ("left", 5)])
    assert result.metadata.n_slices == 5
    # an explicit list takes any drawn leg on the listed image slices
    listed = finetune_on_corrections(tiny_model(), image, with_array(labels, array), slices=[3, 4],
                                     config=FinetuneConfig(max_epochs=1))
    assert sorted(map(tuple, listed.report["leg_slices"])) == [("left", 4), ("right", 3), ("right", 4)]


def test_parse_slice_list():
    assert parse_slice_list("auto") == "auto"
    assert parse_slice_list("5, 1,3-4") == [1, 3, 4, 5]
    for bad in ("", "x", "4-2", "-1"):
        with pytest.raises(InputError):
            parse_slice_list(bad)


def test_progress_and_cancel():
    image, labels = two_legs(n_slices=2)
    seen: list[float] = []
    finetune_on_corrections(tiny_model(), image, labels, config=FinetuneConfig(max_epochs=2),
                            progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        finetune_on_corrections(tiny_model(), image, labels, config=FinetuneConfig(max_epochs=2), cancel=cancel)


def test_augment_moves_image_and_labels_together():
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(48), indexing="ij")
    targets = ((yy // 8) * 3 + xx // 12).remainder(7).expand(3, 32, 48).clone()
    images = targets[:, None].float()  # an image equal to its labels shows whether both moved alike
    gen = torch.Generator().manual_seed(0)
    geometric = FinetuneConfig(intensity_scale=0, intensity_shift=0, noise_std=0)
    out_i, out_t = augment(images, targets, gen, geometric)
    assert out_i.shape == images.shape and out_t.shape == targets.shape
    assert set(out_t.unique().tolist()) <= set(range(7))
    assert 0.5 < (out_t == targets).float().mean() < 1.0  # a small deformation, but a deformation
    assert (out_i[:, 0].round().long() == out_t).float().mean() > 0.9
    none = FinetuneConfig(rotate_deg=0, scale=0, translate=0, intensity_scale=0, intensity_shift=0, noise_std=0)
    same_i, same_t = augment(images, targets, gen, none)
    assert torch.allclose(same_i, images, atol=1e-4) and torch.equal(same_t, targets)


def test_resamples_labels_on_another_overlapping_grid():
    image, labels = two_legs(n_slices=3)
    finer = sitk.Resample(labels, [256, 128, 3], sitk.Transform(), sitk.sitkNearestNeighbor, labels.GetOrigin(),
                          (1.0, 1.0, 5.0), labels.GetDirection(), 0, labels.GetPixelID())
    result = finetune_on_corrections(tiny_model(), image, finer, config=FinetuneConfig(max_epochs=1))
    assert result.report["n_leg_slices"] == 6


@pytest.mark.parametrize("case", ["no overlap", "empty", "foreign labels", "no usable slices", "slice outside"])
def test_bad_input_is_refused_and_nothing_written(tmp_path, case):
    parent_dir = tmp_path / "parent"
    parent = saved_tiny_model(parent_dir)
    before = folder_digest(parent_dir)
    image, labels = two_legs(n_slices=3)
    array = sitk.GetArrayFromImage(labels)
    slices: str | list[int] = "auto"
    if case == "no overlap":
        labels.SetOrigin((1000.0, 0.0, 0.0))
        match = "does not overlap"
    elif case == "empty":
        labels = with_array(labels, np.zeros_like(array))
        match = "empty"
    elif case == "foreign labels":
        array[0, 0, 0] = 40
        labels = with_array(labels, array)
        match = "not in the model"
    elif case == "no usable slices":
        array[(array % 6 == 1) | (array % 6 == 2) | (array % 6 == 3)] = 0  # 3 of 6 muscles per leg
        labels = with_array(labels, array)
        match = "no usable slices"
    else:
        slices = [7]
        match = "outside"
    with pytest.raises(InputError, match=match):
        finetune_on_corrections(parent, image, labels, slices=slices, config=FinetuneConfig(max_epochs=1))
    assert folder_digest(parent_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


def test_save_refuses_the_parent_folder(tmp_path):
    parent = saved_tiny_model(tmp_path / "parent")
    image, labels = two_legs(n_slices=2)
    result = finetune_on_corrections(parent, image, labels, config=FinetuneConfig(max_epochs=1))
    with pytest.raises(InputError, match="parent"):
        result.save(tmp_path / "parent")


def test_fine_tuning_again_locally_gives_a_delta_against_the_server_version(tmp_path, caplog):
    """A local model fine-tuned again: its delta is taken against the server version it descends
    from (found in the registry by version and sha256), with the slices of both runs counted and
    that version's agreement Dice, so it can be pushed; without that version it stays local."""
    import shutil

    from dafne_logic.core.paths import user_models_dir

    server = saved_tiny_model(user_models_dir() / "leg-v1")
    first = finetune_on_corrections(server, *two_legs(seed=1), config=FAST).save(tmp_path / "first")
    local = ModelPackage.load(first)
    image, labels = two_legs(n_slices=4, seed=2)
    again = finetune_on_corrections(local, image, labels, config=FAST)

    assert again.model.manifest.parent_version == local.manifest.version
    assert again.metadata.parent_version == "1" and again.metadata.n_slices == 6 + 4
    assert again.metadata.parent_sha256 == server.manifest.weights_sha256  # the server checks it
    assert again.model.manifest.provenance["finetune"]["server_parent"] == {
        "version": "1", "weights_sha256": server.manifest.weights_sha256, "n_slices": 10}
    rebuilt = apply_delta(server.state_dict, again.delta)
    for k, v in again.model.state_dict.items():
        assert torch.allclose(rebuilt[k], v, rtol=2e-3, atol=2e-3), k
    # the Dice that travels is the server version's on these slices, not the local parent's
    from_server = finetune_on_corrections(server, image, labels, config=replace_epochs(FAST, 1))
    assert again.metadata.dice_per_label == from_server.report["dice_before"]
    assert again.report["dice_before"] != from_server.report["dice_before"]

    shutil.rmtree(user_models_dir() / "leg-v1")
    with caplog.at_level("WARNING"):
        orphan = finetune_on_corrections(local, image, labels, config=FAST)
    assert orphan.metadata.parent_version == local.manifest.version
    assert "not in the model registry" in caplog.text


def replace_epochs(config: FinetuneConfig, epochs: int) -> FinetuneConfig:
    from dataclasses import replace

    return replace(config, max_epochs=epochs)


def test_a_single_leg_scan_takes_its_side_from_the_correction_not_its_position(tmp_path):
    """A right leg lying at positive x (origin not on the patient's midline): the position says
    'left', which would drop every right-side label; the correction's own label values decide."""
    image, labels = two_legs()
    right_image, right_labels = image[:64, :, :], labels[:64, :, :]  # SimpleITK slicing keeps the geometry
    assert right_image.TransformIndexToPhysicalPoint((32, 32, 0))[0] > 0  # where the position would say "left"
    result = finetune_on_corrections(saved_tiny_model(tmp_path / "parent"), right_image, right_labels, config=FAST)
    assert {side for side, _ in result.report["leg_slices"]} == {"right"}


def test_listed_slices_of_a_sagittal_scan_are_refused_not_learnt_as_stripes(tmp_path):
    """Slice numbers count along the image's third axis; in a sagittal scan each axial training slice
    would keep a thin stripe of the correction and teach background everywhere else."""
    image, labels = two_legs()
    sagittal, sagittal_labels = sitk.PermuteAxes(image, [2, 1, 0]), sitk.PermuteAxes(labels, [2, 1, 0])  # k runs along x
    with pytest.raises(InputError, match="axial scan"):
        finetune_on_corrections(saved_tiny_model(tmp_path / "parent"), sagittal, sagittal_labels, slices=[30, 31],
                                config=FAST)


def test_the_held_out_part_is_whole_image_slices_never_one_leg_of_a_trained_slice():
    sources = [("right", z) for z in range(10)] + [("left", z) for z in range(10)]
    train, held = split_holdout(sources, FAST)
    held_slices = {sources[i][1] for i in held}
    assert held_slices == {2, 7}  # every 5th image slice
    assert not held_slices & {sources[i][1] for i in train}
    assert sorted(train + held) == list(range(20))
    assert split_holdout(sources[:4], FAST) == (list(range(4)), [])  # too few leg-slices: nothing held out

