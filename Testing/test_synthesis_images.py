"""Label-to-image synthesis: determinism, tissue completion, contrast regimes, sampler and trainer."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import LEG
from dafne_logic.core.preprocessing import NORMALISED_RANGE
from dafne_logic.inference.manifest import Manifest
from dafne_logic.inference.networks import unet_architecture
from dafne_logic.training.harmonisation import HOLE_LARGEST, MUSCLE_BASE, LegSlice, PartialLabelLoss
from dafne_logic.training.samplers import AnatomyBank, SliceSampler, SynthesisSampler
from dafne_logic.training.synthesis import SynthesisConfig, gaussian_blur, resolution_operator, synthesise
from dafne_logic.training.synthetic_validation import dice_by_class, synthetic_validation
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
    index = torch.tensor([0, 0, 1, 2, 3])
    found = bank.slices_at(index, torch.tensor([3.0, -3.0, -4.0, -5.0, 2.0]), torch.full((5,), 6.0))
    assert found.tolist() == [1, -1, 0, -1, -1]  # nothing below 0 mm; 20 mm is outside the slab; b has one slice
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
    with pytest.raises(InputError, match="no slice with a labelled muscle"):  # one sentence for train --pairs
        SliceSampler([(image, np.zeros_like(target))], SynthesisConfig(size=(32, 32)))


# --- realism the synthesis adds (issue 11): each test checks that the effect happens -------------

QUIET_NEW = replace(QUIET, p_leg_rotation=0.0, p_other_leg=0.0, p_fov_cut=0.0, p_empty=0.0,
                    p_low_resolution_acquisition=0.0, partial_volume_px=(1.0, 1.0))


def render(regime: str, config: SynthesisConfig = QUIET_NEW, seed: int = 1, slices=None):
    tissue, target, complete = batch(slices or [leg()])
    return synthesise(tissue, target, complete, torch.Generator().manual_seed(seed), replace(config, regimes=(regime,)))


def ring_masks():
    """(muscle, fat ring just outside the muscles, rim between them) masks of the 48x48 output of leg()."""
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)  # leg() is centred on canvas pixel 32, output pixel 24
    return (torch.from_numpy((r > 7) & (r < 14)), torch.from_numpy((r > 17.5) & (r < 19.5)),
            torch.from_numpy((r > 14.5) & (r < 17.5)))


def test_leg_rotation_about_its_own_axis_reaches_35_degrees():
    tissue, target, complete = batch([leg()] * 64)  # tibialis anterior (4) in front of the centre
    angles = {}
    for p in (0.0, 1.0):
        config = replace(QUIET_NEW, p_leg_rotation=p, regimes=("t1",))
        _, labels = synthesise(tissue, target, complete, torch.Generator().manual_seed(3), config)
        found = []
        for sample in labels:
            rows, cols = torch.nonzero(sample == 4, as_tuple=True)
            found.append(math.degrees(math.atan2(float(cols.float().mean()) - 24, 24 - float(rows.float().mean()))))
        angles[p] = np.array(found)
    assert np.abs(angles[0.0]).max() < 5  # QUIET: no rotation (only the ±10 % anisotropy)
    assert np.abs(angles[1.0]).max() > 28 and np.abs(angles[1.0]).max() < 37
    assert angles[1.0].min() < -20 and angles[1.0].max() > 20  # both directions


def test_other_leg_touching_or_apart_is_background():
    config = replace(QUIET_NEW, p_other_leg=1.0, size=(64, 96), fat_thickness_px=(1, 1))
    wide = [LegSlice("s", "right", 0.0, np.pad(s.tissue, ((0, 0), (16, 16))), np.pad(s.target, ((0, 0), (16, 16))))
            for s in [leg()]]
    touching, labels = render("t1", replace(config, other_leg_gap_mm=(0, 0)), slices=wide)
    apart, _ = render("t1", replace(config, other_leg_gap_mm=(12, 12)), slices=wide)
    alone, _ = render("t1", replace(config, p_other_leg=0.0), slices=wide)
    # The leg spans output columns ~32..63 (centre 48, radius 16); its mirror image lies medially (beyond 64).
    medial = (slice(24, 40), slice(66, 80))
    assert float(alone[0, 0][medial].mean()) < 0.05
    assert float(touching[0, 0][medial].mean()) > 0.2 and not labels[0][:, 66:].any()
    gap = (slice(24, 40), slice(65, 74))
    assert float(apart[0, 0][gap].mean()) < float(touching[0, 0][gap].mean()) - 0.1  # air between the legs


def test_opposed_phase_has_dark_rims_and_muscle_like_fat_in_phase_does_not():
    muscle, fat, rim = ring_masks()
    levels = {}
    for regime in ("opposed_phase", "in_phase"):
        image, _ = render(regime, replace(QUIET_NEW, fat_thickness_px=(12, 12)))
        image = image[0, 0]
        levels[regime] = {k: float(image[m].median()) for k, m in (("muscle", muscle), ("fat", fat))}
        levels[regime]["rim"] = float(image[rim].quantile(0.2))  # the darkest fifth of the interface
    op, ip = levels["opposed_phase"], levels["in_phase"]
    assert abs(op["muscle"] - op["fat"]) < 0.15  # muscle and fat of similar brightness
    assert op["rim"] < 0.6 * min(op["muscle"], op["fat"])  # cancellation where fat meets water
    assert ip["rim"] > 0.8 * min(ip["muscle"], ip["fat"])  # in phase: no cancellation
    assert ip["fat"] > ip["muscle"] + 0.1


def test_fat_only_and_fat_fraction_images():
    muscle, fat, _ = ring_masks()
    fat_only, _ = render("fat", replace(QUIET_NEW, fat_thickness_px=(12, 12)))
    assert float(fat_only[0, 0][fat].mean()) > float(fat_only[0, 0][muscle].mean()) + 0.5
    biased = replace(QUIET_NEW, fat_thickness_px=(12, 12), bias=0.8)
    fraction, _ = render("fat_fraction", biased)
    plain, _ = render("fat_fraction", replace(biased, bias=0.0))
    assert float(fraction[0, 0][fat].median()) > 0.7 and float(fraction[0, 0][muscle].median()) < 0.15
    assert torch.allclose(fraction, plain)  # a fat-fraction map carries no bias field
    t1_biased, _ = render("t1", biased)
    t1_plain, _ = render("t1", replace(biased, bias=0.0))
    assert not torch.allclose(t1_biased, t1_plain)


def test_low_resolution_acquisition_has_partial_volume():
    identity = resolution_operator(torch.tensor([1.0]), 12)[0]
    assert torch.allclose(identity, torch.eye(12), atol=1e-6)
    operator = resolution_operator(torch.tensor([3.0, 2.4]), 30)
    assert torch.allclose(operator.sum(2), torch.ones(2, 30), atol=1e-5)  # intensities are kept
    step = (torch.arange(30) >= 14).float()
    blurred = operator[0] @ step
    assert ((blurred > 0.05) & (blurred < 0.95)).sum() >= 3  # the edge spreads over a 3-pixel cell
    muscle, fat, rim = ring_masks()
    sharp, _ = render("t1", replace(QUIET_NEW, fat_thickness_px=(12, 12)))
    low, _ = render("t1", replace(QUIET_NEW, fat_thickness_px=(12, 12), p_low_resolution_acquisition=1.0,
                                  low_resolution_mm=(3.0, 3.0)))
    edges = lambda image: float((image[0, 0, 1:] - image[0, 0, :-1]).abs().max())  # noqa: E731
    assert edges(low) < 0.7 * edges(sharp)


def test_thick_slices_average_the_slices_around():
    """A slab over three 2 mm slices: where only the neighbours have muscle, muscle shows at a third."""
    centre, neighbour = leg(split=False), leg(split=False, shift=6)
    tissue, target, complete = batch([centre])
    neighbours = torch.from_numpy(np.stack([neighbour.tissue, neighbour.tissue]))[None]
    config = replace(QUIET_NEW, regimes=("water",), fat_thickness_px=(14, 14))
    thick, _ = synthesise(tissue, target, complete, torch.Generator().manual_seed(2), config,
                          neighbours=neighbours, neighbour_weights=torch.tensor([[1 / 3, 1 / 3]]))
    thin, _ = synthesise(tissue, target, complete, torch.Generator().manual_seed(2), config,
                         neighbours=neighbours, neighbour_weights=torch.zeros(1, 2))
    only_neighbour = (slice(20, 28), slice(40, 42))  # inside the shifted ring, outside the centre ring
    assert float(thick[0, 0][only_neighbour].mean()) > float(thin[0, 0][only_neighbour].mean()) + 0.1
    bank = AnatomyBank.from_sources([[leg(z, "a") for z in (0.0, 2.0, 4.0)]])
    sampler = SynthesisSampler(bank, replace(config, p_thick_slice=1.0, slice_thickness_mm=(6.0, 6.0)))
    found = bank.slices_at(torch.tensor([1, 1]), torch.tensor([2.0, -2.0]), torch.tensor([4.0, 4.0]))
    assert found.tolist() == [2, 0] and sampler(torch.Generator().manual_seed(0), 2)[0].shape == (2, 1, 48, 48)


def test_dim_blurry_noisy_fat_suppressed_images():
    muscle, fat, _ = ring_masks()
    poor, _ = render("fs_poor")
    clean, _ = render("stir")
    pairs = muscle[:, 1:] & muscle[:, :-1]  # noise, not the muscles' shading: neighbour differences

    def pixel_noise(image: torch.Tensor) -> float:
        return float((image[:, 1:] - image[:, :-1])[pairs].std())

    assert pixel_noise(poor[0, 0]) > 4 * pixel_noise(clean[0, 0])
    assert float(poor[0, 0][fat].mean()) < float(poor[0, 0][muscle].mean())  # fat suppressed


def test_field_of_view_cut_and_empty_slices_have_no_labels():
    legs = [leg()] * 8
    cut, labels = render("t1", replace(QUIET_NEW, p_fov_cut=1.0), seed=4, slices=legs)
    _, full = render("t1", seed=4, slices=legs)
    lost = full.bool() & ~labels.bool()
    assert lost.flatten(1).any(1).sum() >= 4 and not (labels.bool() & ~full.bool()).any()
    assert float(cut[:, 0][lost].abs().max()) == 0.0  # nothing acquired beyond the edge
    images, targets = synthesise(*batch([leg(), leg()]), torch.Generator().manual_seed(5),
                                 replace(QUIET_NEW, p_empty=1.0, noise=(0.05, 0.05)))
    assert not targets.any() and float(images.std()) > 0.01  # noise, no body, no label


def test_fat_infiltration_is_patchy_and_reaches_mostly_fat_muscles():
    """Infiltrated muscles (fat-fraction images, where a pixel's value is its fat fraction) range up to
    mostly fat, and within one muscle the fat varies from patch to patch unless patchiness is off."""
    tissue, target, complete = batch([leg()] * 48)
    muscle, fat, _ = ring_masks()
    air = torch.from_numpy(np.hypot(*np.mgrid[-24:24, -24:24]) > 23)
    halves = (muscle & torch.from_numpy(np.mgrid[:48, :48][0] >= 26), muscle & torch.from_numpy(np.mgrid[:48, :48][0] < 22))

    def relative_fat(config: SynthesisConfig) -> tuple[np.ndarray, np.ndarray]:
        """Per muscle of every image: median fat relative to the fat ring, and its interquartile range."""
        images, _ = synthesise(tissue, target, complete, torch.Generator().manual_seed(3), replace(config, regimes=("fat_fraction",)))
        medians, spreads = [], []
        for image in images[:, 0]:
            zero, full = float(image[air].median()), float(image[fat].median())
            for half in halves:
                values = (image[half] - zero) / (full - zero)
                medians.append(float(values.median()))
                spreads.append(float(values.quantile(0.75) - values.quantile(0.25)))
        return np.array(medians), np.array(spreads)

    infiltrated = replace(QUIET_NEW, p_infiltration=1.0, fat_thickness_px=(12, 12))
    medians, spreads = relative_fat(infiltrated)
    assert medians.max() > 0.7  # some muscles mostly fat (severity up to 0.9; it stopped at 0.7)
    assert (medians < 0.15).sum() >= 10  # half the muscles are spared
    _, smooth_spreads = relative_fat(replace(infiltrated, infiltration_patchiness=0.0))
    moderate = (medians > 0.25) & (medians < 0.7)
    assert moderate.sum() >= 5
    assert np.median(spreads[moderate]) > 2 * np.median(smooth_spreads[moderate]) and np.median(spreads[moderate]) > 0.15
    assert relative_fat(replace(infiltrated, p_infiltration=0.0))[0].max() < 0.15


def test_the_share_of_infiltrated_muscles_is_drawn_per_image():
    """``infiltration_affected`` sets the share of an infiltrated image's muscles that lose muscle to
    fat: none at (0, 0), all of them at (1, 1) (the few not fatty then are the ones drawn mild)."""
    tissue, target, complete = batch([leg()] * 64)
    muscle, _, _ = ring_masks()
    halves = (muscle & torch.from_numpy(np.mgrid[:48, :48][0] >= 26), muscle & torch.from_numpy(np.mgrid[:48, :48][0] < 22))

    def fatty_share(affected: tuple[float, float]) -> float:
        config = replace(QUIET_NEW, p_infiltration=1.0, fat_thickness_px=(12, 12), infiltration_patchiness=0.0,
                         infiltration_affected=affected, regimes=("fat_fraction",))
        images, _ = synthesise(tissue, target, complete, torch.Generator().manual_seed(9), config)
        medians = [float(image[half].median()) for image in images[:, 0] for half in halves]
        return float(np.mean(np.array(medians) > 0.15))

    none, half, every = fatty_share((0.0, 0.0)), fatty_share((0.5, 0.5)), fatty_share((1.0, 1.0))
    assert none == 0.0
    assert every > 0.45 and every > half + 0.15  # severity u**1.5 * 0.9 exceeds 0.15 for 70 % of muscles
