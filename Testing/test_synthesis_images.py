"""Label-to-image synthesis: determinism, tissue completion, contrast regimes, sampler and trainer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dafne_logic.core.labels import LEG
from dafne_logic.core.preprocessing import NORMALISED_RANGE
from dafne_logic.inference.model_package import Manifest
from dafne_logic.inference.networks import unet_architecture
from dafne_logic.training.harmonisation import HOLE_LARGEST, MUSCLE_BASE, LegSlice, PartialLabelLoss
from dafne_logic.training.synthesis import (
    AnatomyBank,
    SliceSampler,
    SynthesisConfig,
    SynthesisSampler,
    dice_by_class,
    gaussian_blur,
    synthesise,
    synthetic_validation,
)
from dafne_logic.training.trainer import TrainConfig, train_model

QUIET = SynthesisConfig(size=(48, 48), rotation_deg=0, scale=(1, 1), shear=0, shift=0, elastic_px=0, bias=0,
                        blur_px=0, p_low_resolution=0, noise=(0, 0), gamma_log_sd=0, p_infiltration=0,
                        p_thick_slice=0, p_bone=1.0, fat_thickness_px=(8, 8))


def leg(z: float = 0.0, subject: str = "s1", shift: int = 0, split: bool = True) -> LegSlice:
    """A 64x64 canvas: soleus (1) and tibialis anterior (4) around a hole (the 'tibia'); with
    ``split=False`` the whole ring is soleus."""
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32 - shift)
    tissue = np.zeros((64, 64), np.uint8)
    target = np.zeros((64, 64), np.uint8)
    ring = (r >= 5) & (r < 16)
    tissue[ring & (yy >= 32)], target[ring & (yy >= 32)] = MUSCLE_BASE + 1, 1
    if split:
        tissue[ring & (yy < 32)], target[ring & (yy < 32)] = MUSCLE_BASE + 4, 4
    else:
        tissue[ring], target[ring] = MUSCLE_BASE + 1, 1
    tissue[r < 5] = HOLE_LARGEST
    return LegSlice(subject, "right", z, tissue, target)


def batch(slices: list[LegSlice]):
    return (torch.from_numpy(np.stack([s.tissue for s in slices])), torch.from_numpy(np.stack([s.target for s in slices])),
            torch.tensor([s.complete for s in slices]))


def test_same_seed_same_images_other_seed_other_images():
    tissue, target, complete = batch([leg(), leg(shift=3)])
    config = SynthesisConfig(size=(48, 48))
    a = synthesise(tissue, target, complete, torch.Generator().manual_seed(5), config)
    b = synthesise(tissue, target, complete, torch.Generator().manual_seed(5), config)
    c = synthesise(tissue, target, complete, torch.Generator().manual_seed(6), config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (2, 1, 48, 48) and a[0].dtype == torch.float32 and a[1].dtype == torch.int64
    assert float(a[0].min()) >= NORMALISED_RANGE[0] - 1e-6 and float(a[0].max()) <= NORMALISED_RANGE[1] + 1e-6
    assert set(a[1].unique().tolist()) <= {0, 1, 4}


def test_regimes_order_fat_and_muscle_and_complete_the_body():
    tissue, target, complete = batch([leg()])
    muscle = (target[0, 8:56, 8:56] > 0)
    hole = tissue[0, 8:56, 8:56] == HOLE_LARGEST
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)
    fat_ring = torch.from_numpy((r > 17.5) & (r < 21))  # just outside the muscles: grown fat
    air = torch.from_numpy(r > 30)
    means = {}
    for regime in ("t1", "water", "stir"):
        image, _ = synthesise(tissue, target, complete, torch.Generator().manual_seed(1), replace(QUIET, regimes=(regime,)))
        image = image[0, 0]
        means[regime] = {"muscle": float(image[muscle].mean()), "fat": float(image[fat_ring].mean()),
                         "air": float(image[air].mean()), "core": float(image[hole & (torch.from_numpy(r) < 2)].mean())}
    assert means["t1"]["fat"] > means["t1"]["muscle"] + 0.3  # T1: fat bright
    assert means["water"]["muscle"] > means["water"]["fat"] + 0.3  # Dixon water: fat dark
    assert means["stir"]["muscle"] > means["stir"]["fat"] + 0.2  # STIR: fat suppressed
    assert means["t1"]["core"] > means["t1"]["muscle"] + 0.3  # the hole became bone: fatty marrow on T1
    for regime in means:
        assert means[regime]["air"] < 0.05  # outside the grown body: air


def test_bank_neighbours_weights_and_sampler():
    slices = [leg(z, "a") for z in (0.0, 5.0, 20.0)] + [leg(0.0, "b")]
    bank = AnatomyBank.from_sources([slices[:3], slices[3:]], source_weights=[1.0, 3.0])
    assert bank.neighbour.tolist() == [1, -1, -1, -1]  # 20 mm is too far for a thick-slice neighbour
    assert bank.weight.tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 3 / 4])
    sampler = SynthesisSampler(bank, SynthesisConfig(size=(48, 48)))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x1, y1 = sampler(g1, 4)
    x2, y2 = sampler(g2, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (4, 1, 48, 48)


def test_gaussian_blur_per_image_sigma_keeps_mass():
    image = torch.zeros(2, 1, 31, 31)
    image[:, :, 15, 15] = 1.0
    out = gaussian_blur(image, torch.tensor([0.0, 2.0]))
    assert torch.allclose(out[0], image[0], atol=1e-6)
    assert float(out[1].sum()) == pytest.approx(1.0, abs=1e-4) and float(out[1].max()) < 0.1


def test_dice_by_class_ignores_group_codes():
    target = torch.tensor([[1, 1, 2, 9]])
    prediction = torch.tensor([[1, 2, 2, 1]])
    scores = dice_by_class(prediction, target, n_classes=4)
    assert scores[0] == pytest.approx(2 / 3) and scores[1] == pytest.approx(2 / 3) and torch.isnan(scores[2])


def test_trainer_learns_from_synthetic_images(tmp_path):
    slices = [leg(z, shift=s, split=False) for z, s in ((0.0, 0), (4.0, 2), (8.0, -2))]
    bank = AnatomyBank.from_sources([slices])
    config = SynthesisConfig(size=(48, 48), regimes=("t1", "water"))
    tiny = {"channels": [8, 16, 16], "strides": [2, 2], "num_res_units": 0}
    manifest = Manifest("toy-leg", "leg", "1", unet_architecture(LEG.n_classes, tiny), LEG)
    validate = synthetic_validation(bank, config, [m.name for m in LEG.muscles], samples=8, seed=99)
    package = train_model(manifest, SynthesisSampler(bank, config), TrainConfig(steps=100, batch_size=4, lr=1e-2,
                          warmup_steps=5, device="cpu", checkpoint_every=0, log_every=100), tmp_path / "m",
                          validate=validate, loss_fn=PartialLabelLoss(LEG.n_classes))
    final = package.manifest.provenance["training"]["final_validation"]
    assert final["soleus"] > 0.6


def test_validation_leaves_unlabelled_muscles_out():
    bank = AnatomyBank.from_sources([[leg()]])
    names = [m.name for m in LEG.muscles]
    network = torch.nn.Conv2d(1, LEG.n_classes, 1)  # predicts something everywhere
    plain = synthetic_validation(bank, SynthesisConfig(size=(48, 48)), names, samples=8)(network)
    skipping = synthetic_validation(bank, SynthesisConfig(size=(48, 48)), names, samples=8,
                                    unlabelled=frozenset({LEG.muscle_index("peroneus")}))(network)
    assert np.isnan(skipping["peroneus"]) and skipping["soleus"] == plain["soleus"]


def test_slice_sampler_augments_real_crops():
    rng = np.random.default_rng(0)
    image = rng.random((2, 40, 32)).astype(np.float32)
    target = np.zeros((2, 40, 32), np.uint8)
    target[:, 10:20, 10:20] = 3
    sampler = SliceSampler([(image, target)], SynthesisConfig(size=(32, 32)))
    x, y = sampler(torch.Generator().manual_seed(0), 3)
    assert x.shape == (3, 1, 32, 32) and y.shape == (3, 32, 32)
    assert set(y.unique().tolist()) <= {0, 3} and (y == 3).any()
    with pytest.raises(ValueError):
        SliceSampler([(image, np.zeros_like(target))], SynthesisConfig(size=(32, 32)))
