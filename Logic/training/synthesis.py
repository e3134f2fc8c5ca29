"""Label-to-image synthesis: random MR-like images from per-leg anatomy (SynthSeg-style).

Given batches of :class:`~dafne_logic.training.harmonisation.LegSlice` canvases (a *tissue* map and a
*target* map), :func:`synthesise` returns network inputs and targets, in torch, batched, on CPU or
CUDA, fully determined by one ``torch.Generator``; every draw is vectorised over the batch:

1. **The other leg** (some images): the leg's mirror image beside its medial side, touching it or a
   few centimetres apart, as when both legs are in the field of view (target: background).
2. **Spatial**: random affine (rotation, anisotropic scale, shear, shift) plus a smooth elastic
   field, applied to both maps with nearest-neighbour sampling, cropped to the output size. Some
   images are rotated about the leg's own long axis by up to ±35° (legs lie externally rotated
   when people lie supine, and so do the Visible Human cadaver calves).
3. **Tissue completion** (label maps carry muscles only): the body outline is a smoothed,
   thresholded copy of the muscle compartment grown by a random, angle-varying subcutaneous fat
   thickness, with a skin rim; the largest unlabelled hole inside the compartment (usually the
   femur or tibia) becomes bone with cortex and marrow; the other holes become intermuscular fat,
   or unlabelled muscle.
4. **Field of view and empty slices**: some images are cut by a straight field-of-view edge
   (nothing, and no label, beyond it); some hold no body at all (noise only, no label), as slices
   beyond the end of the body do.
5. **Intensities** per tissue, drawn per image from a contrast regime: T1-, T2-, PD-, Dixon water-,
   Dixon fat-, STIR-like, dim fat-suppressed (``fs_poor``: low signal, blur and noise), uniformly
   random (SynthSeg), or from a two-point Dixon signal model (proton density ρ and fat fraction f
   per tissue, f blurred by partial volume): gradient-echo **in-phase** ρ, **opposed-phase**
   ρ·|1 − 2f| (muscle and fat of similar brightness, dark cancellation rims wherever fat meets
   water) and **fat-fraction** maps f (no bias field). Per-muscle jitter and, for some images, fat
   infiltration of some muscles (as in neuromuscular disease).
6. **Acquisition**: partial volume with the slices around it (thick slices, 4–10 mm, from the
   anatomy bank), multiplicative bias field, Gaussian blur, in-plane low resolution (one axis, or a
   2–3.5 mm acquisition on both axes with partial volume), Rician noise, gamma.
7. **Normalisation** as :mod:`dafne_logic.core.preprocessing` does it: the body's 0.5–99.5 percentiles
   map to 0 and 1, clipped to (-0.1, 1.1).

Canvases are in the network's orientation (the left leg already mirrored), so there is no random
left/right flip here: mirroring happened when the left leg was cut (see harmonisation). Which
slices are drawn, and batches of real crops, are :mod:`dafne_logic.training.samplers`' job.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dafne_logic.core.preprocessing import NORMALISED_RANGE
from dafne_logic.phantoms.anatomy import Tissue
from dafne_logic.training.harmonisation import BONE, HOLE, HOLE_LARGEST, MUSCLE_BASE

REGIMES = ("t1", "t2", "pd", "water", "fat", "stir", "fs_poor", "in_phase", "opposed_phase", "fat_fraction",
           "random")

# Mean intensities (relative) of air, fat, skin, muscle, cortex, marrow, vessels per regime; for the
# Dixon regimes these are proton densities ρ (the signal model adds the fat fraction).
_REGIME_MEANS = {
    "t1": (0.02, 0.90, 0.55, 0.32, 0.04, 0.85, 0.20),
    "t2": (0.02, 0.75, 0.45, 0.22, 0.03, 0.65, 0.80),
    "pd": (0.02, 0.85, 0.60, 0.48, 0.05, 0.80, 0.60),
    "water": (0.02, 0.08, 0.35, 0.60, 0.03, 0.10, 0.75),
    "fat": (0.02, 0.90, 0.45, 0.07, 0.03, 0.85, 0.05),
    "stir": (0.02, 0.06, 0.35, 0.32, 0.03, 0.08, 0.85),
    "fs_poor": (0.02, 0.12, 0.25, 0.22, 0.03, 0.12, 0.45),
    "in_phase": (0.02, 0.95, 0.60, 0.62, 0.03, 0.90, 0.50),
    "opposed_phase": (0.02, 0.80, 0.60, 0.72, 0.03, 0.80, 0.50),
    "fat_fraction": (0.02, 0.95, 0.60, 0.70, 0.03, 0.90, 0.50),
    "random": (0.0,) * 7,
}
# Two-point Dixon: signal = ρ_eff · |a + b·f| per regime (a, b, ρ_eff = 1 for fat-fraction maps).
_DIXON_SIGNAL = {"in_phase": (1.0, 0.0, 0.0), "opposed_phase": (1.0, -2.0, 0.0), "fat_fraction": (0.0, 1.0, 1.0)}
# Fat fraction of each fixed tissue slot (background, skin, subcutaneous fat, fascia, intermuscular
# fat, cortex, marrow, unlabelled muscle, vessels); labelled muscles are MUSCLE_FAT_FRACTION.
_FAT_FRACTION = (0.0, 0.30, 0.92, 0.50, 0.88, 0.0, 0.85, 0.04, 0.0)
MUSCLE_FAT_FRACTION = 0.04
N_TISSUE_SLOTS = 80  # compact tissue indices: 0..MUSCLE_BASE-1 fixed tissues, then muscles/groups


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges of the random draws. Sizes in pixels of the model spacing unless named ``_mm``."""

    size: tuple[int, int] = (160, 160)  # output (H, W)
    regimes: tuple[str, ...] = REGIMES
    spacing_mm: float = 1.0  # the model's in-plane spacing: converts the ``_mm`` ranges to pixels
    rotation_deg: float = 15.0
    p_leg_rotation: float = 0.35  # rotation about the leg's own long axis drawn from ±leg_rotation_deg
    leg_rotation_deg: float = 35.0
    p_other_leg: float = 0.25  # the other leg beside the medial side
    other_leg_gap_mm: tuple[float, float] = (0.0, 40.0)  # 0: touching
    scale: tuple[float, float] = (0.8, 1.2)  # isotropic part; anisotropy adds ±10 %
    shear: float = 0.08
    shift: float = 0.08  # fraction of the output size
    elastic_px: float = 4.0  # max displacement of the smooth elastic field
    fat_thickness_px: tuple[float, float] = (3.0, 30.0)
    p_bone: float = 0.8  # the largest hole drawn as bone
    p_infiltration: float = 0.4
    # Share of an infiltrated image's muscles that are affected, drawn per image: in advanced disease
    # nearly every muscle is, early on a few (a fixed half never showed a leg fatty throughout).
    infiltration_affected: tuple[float, float] = (0.3, 1.0)
    # Severity (share of a muscle replaced by fat) reaches infiltration_max; within a muscle it varies
    # by ±infiltration_patchiness (relative) on infiltration_patch_px features: fat infiltration in
    # neuromuscular disease is patchy ("moth-eaten"), and the worst muscles are mostly fat.
    infiltration_max: float = 0.9
    infiltration_patchiness: float = 0.6
    infiltration_patch_px: float = 6.0
    p_thick_slice: float = 0.4
    slice_thickness_mm: tuple[float, float] = (4.0, 10.0)
    p_fov_cut: float = 0.1
    p_empty: float = 0.03  # no body at all: noise only, no labels
    bias: float = 0.5  # max log amplitude of the bias field
    blur_px: float = 1.2
    p_low_resolution: float = 0.3  # one axis 1.3-2.5 times coarser
    p_low_resolution_acquisition: float = 0.15  # both axes at low_resolution_mm
    low_resolution_mm: tuple[float, float] = (2.0, 3.5)
    partial_volume_px: tuple[float, float] = (0.6, 1.4)  # blur of the fat fraction (Dixon rims)
    noise: tuple[float, float] = (0.005, 0.06)
    poor_noise: tuple[float, float] = (0.06, 0.15)  # fs_poor images
    poor_blur_px: tuple[float, float] = (1.5, 3.0)
    gamma_log_sd: float = 0.25

    def __post_init__(self) -> None:
        unknown = set(self.regimes) - set(_REGIME_MEANS)
        if unknown or not self.regimes:
            raise ValueError(f"unknown contrast regimes {sorted(unknown)}; known: {', '.join(REGIMES)}")
        share = self.infiltration_affected
        if not (isinstance(share, tuple) and len(share) == 2 and 0.0 <= share[0] <= share[1] <= 1.0):
            raise ValueError(f"infiltration_affected must be a (low, high) share with 0 <= low <= high <= 1, not {share!r}")


# Set by the recipe or the caller, never by a KEY=VALUE override: the crop, the model's grid, the regimes.
_NOT_OVERRIDABLE = frozenset({"size", "spacing_mm", "regimes"})


def synthesis_overrides(settings: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` settings (JSON values; lists become tuples) checked against :class:`SynthesisConfig`,
    e.g. ``["p_infiltration=0.3", "infiltration_affected=[0.5,0.5]"]`` -> ``{"p_infiltration": 0.3, ...}``.

    Each value must have the shape of the range's default: a finite number >= 0 for a number (0..1
    for a probability ``p_*``), a ``[low, high]`` pair of such numbers for a pair (every range here
    is a size, a magnitude or a share); a key given twice keeps the last value.

    Raises:
        ValueError: a setting without ``=``, a key that is no settable range (the nearest names are
            suggested), a value that is not JSON or not of the range's shape, or a combination the
            synthesis refuses; the message names the setting.
    """
    settable = sorted(set(SynthesisConfig.__dataclass_fields__) - _NOT_OVERRIDABLE)
    defaults = SynthesisConfig()
    changes: dict[str, Any] = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals:
            raise ValueError(f"--synthesis {setting}: write KEY=VALUE, e.g. p_infiltration=0.5")
        if key not in settable:
            near = difflib.get_close_matches(key, settable, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else f"; one of {', '.join(settable)}"
            raise ValueError(f"--synthesis {setting}: not a SynthesisConfig range one can set here{hint}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--synthesis {setting}: the value is not JSON ({error.msg})") from None
        problem = _shape_problem(key, parsed, getattr(defaults, key))
        if problem:
            raise ValueError(f"--synthesis {setting}: {problem}")
        changes[key] = tuple(float(v) for v in parsed) if isinstance(parsed, list) else float(parsed)
    try:
        SynthesisConfig(**changes)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--synthesis {' '.join(settings)}: {error}") from None
    return changes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _shape_problem(key: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot replace the range ``key`` whose default is ``default``; None when it can."""
    if isinstance(default, tuple):
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            return f"{key} is a [low, high] pair of numbers >= 0, like {list(default)}"
        if value[0] > value[1]:
            return f"{key} needs low <= high"
        return None
    if not _is_number(value):
        return f"{key} is a finite number >= 0, like {default}"
    if key.startswith("p_") and not 0.0 <= value <= 1.0:
        return f"{key} is a probability, between 0 and 1"
    return None


def uniform_draws(rng: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    """(n,) independent draws from U(low, high) on ``device``."""
    return low + (high - low) * torch.rand(n, generator=rng, device=device)


def smooth_field(rng: torch.Generator, batch: int, size: tuple[int, int], grid: int,
                 device: torch.device, channels: int = 1) -> torch.Tensor:
    """(B, channels, H, W) smooth random field of about unit amplitude: a ``grid``×``grid`` normal
    lattice upsampled bicubically."""
    coarse = torch.randn(batch, channels, grid, grid, generator=rng, device=device)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, 1, H, W) tensor with one ``sigma`` (pixels) per image.

    Zero padding: images are blurred against the air around them. One grouped convolution per axis
    serves the whole batch."""
    batch, _, h, w = image.shape
    sigma = torch.as_tensor(sigma, dtype=image.dtype, device=image.device).expand(batch)
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    flat = image.reshape(1, batch, h, w)
    flat = F.conv2d(flat, kernel.view(batch, 1, -1, 1), padding=(radius, 0), groups=batch)
    flat = F.conv2d(flat, kernel.view(batch, 1, 1, -1), padding=(0, radius), groups=batch)
    return flat.view(batch, 1, h, w)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius < 1:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius) > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def spatial_grid(rng: torch.Generator, batch: int, canvas: tuple[int, int], config: SynthesisConfig,
                  device: torch.device) -> torch.Tensor:
    """(B, h, w, 2) sampling grid (normalised canvas coordinates) of a random affine + elastic map."""
    h, w = config.size
    # The canvas is centred on the leg, so a rotation about its centre turns the leg about its own axis.
    wide = torch.rand(batch, generator=rng, device=device) < config.p_leg_rotation
    limit = torch.where(wide, config.leg_rotation_deg, config.rotation_deg)
    angle = uniform_draws(rng, batch, -1, 1, device) * torch.deg2rad(limit)
    zoom = uniform_draws(rng, batch, *config.scale, device)
    aniso = uniform_draws(rng, batch, 0.9, 1.1, device)
    sx, sy = zoom * aniso, zoom / aniso
    shear = uniform_draws(rng, batch, -config.shear, config.shear, device)
    shift = uniform_draws(rng, 2 * batch, -config.shift, config.shift, device).view(batch, 2) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output pixel (normalised over h, w) -> canvas normalised coordinates; the output covers the
    # central h x w pixels of the canvas at scale 1 (zoom > 1 shows the anatomy larger).
    fx, fy = w / canvas[1], h / canvas[0]
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = cos / sx * fx
    theta[:, 0, 1] = (-sin + shear) / sx * fy
    theta[:, 1, 0] = sin / sy * fx
    theta[:, 1, 1] = cos / sy * fy
    theta[:, :, 2] = shift * torch.tensor([fx, fy], device=device)
    grid = F.affine_grid(theta, [batch, 1, h, w], align_corners=False)
    amplitude = uniform_draws(rng, batch, 0, config.elastic_px, device).view(batch, 1, 1, 1)
    field = smooth_field(rng, batch, (h, w), 5, device, channels=2) * amplitude
    scale = torch.tensor([2.0 / canvas[1], 2.0 / canvas[0]], device=device)
    return grid + field.permute(0, 2, 3, 1) * scale


def _complete_body(tissue: torch.Tensor, complete: torch.Tensor, rng: torch.Generator,
                   config: SynthesisConfig) -> torch.Tensor:
    """Grow skin and subcutaneous fat around the muscle compartment of incomplete anatomy.

    ``tissue`` (B, H, W) int64 tissue codes; returns a new tensor."""
    batch, h, w = tissue.shape
    device = tissue.device
    compartment = (tissue > 0).float()[:, None]
    thickness = uniform_draws(rng, batch, *config.fat_thickness_px, device)
    wobble = smooth_field(rng, batch, (h // 2, w // 2), 4, device)
    small = F.avg_pool2d(compartment, 2)
    # Blur then threshold at 0.07: the outline moves out by about 1.5 sigma (half-size pixels),
    # more or less around the limb as the smooth wobble shifts the threshold.
    level = torch.sigmoid(math.log(0.07 / 0.93) + 0.8 * wobble)
    body = gaussian_blur(small, thickness / 3.0) > level
    body = F.interpolate(body.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
    body |= compartment[:, 0] > 0
    skin_width = 1 + int(torch.randint(0, 2, (1,), generator=rng, device=device))
    rim = body & ~_erode(body[:, None], skin_width)[:, 0]
    out = tissue.clone()
    grow = ~complete.view(-1, 1, 1) & (tissue == 0)
    out[grow & body] = int(Tissue.SUBCUTANEOUS_FAT)
    out[grow & rim] = int(Tissue.SKIN)
    return out


def _bones(tissue: torch.Tensor, rng: torch.Generator, config: SynthesisConfig) -> torch.Tensor:
    """Cortex and marrow inside labelled bones and (with probability ``p_bone``) the largest hole;
    the cortex is 1 to 3 pixels thick, drawn per image."""
    batch = tissue.shape[0]
    device = tissue.device
    as_bone = torch.rand(batch, generator=rng, device=device) < config.p_bone
    bone = (tissue == BONE) | ((tissue == HOLE_LARGEST) & as_bone.view(-1, 1, 1))
    cortex_px = torch.randint(1, 4, (batch,), generator=rng, device=device).view(-1, 1, 1)
    once = _erode(bone[:, None], 1)
    twice = _erode(once, 1)
    thrice = _erode(twice, 1)
    inner = torch.where(cortex_px == 1, once[:, 0], torch.where(cortex_px == 2, twice[:, 0], thrice[:, 0]))
    out = tissue.clone()
    out[bone] = int(Tissue.CORTICAL_BONE)
    out[inner] = int(Tissue.MARROW)
    return out


@dataclass(frozen=True)
class Contrast:
    """Per-image intensity model: signal = ρ_eff · |a + b·f| with ρ the tissue's mean (proton
    density for the Dixon regimes) and f its fat fraction; ``a = 1, b = 0`` for every regime but
    opposed-phase and fat-fraction images. Tensors are (B, N_TISSUE_SLOTS) or (B,)."""

    rho: torch.Tensor
    fat_fraction: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    unit_rho: torch.Tensor  # 1 for fat-fraction maps (ρ_eff = 1 in the body), else 0
    regime: torch.Tensor  # index into config.regimes
    severity: torch.Tensor  # (B, N_TISSUE_SLOTS) mean share of each muscle replaced by fat (0 elsewhere)
    fat_rho: torch.Tensor  # (B,) ρ of fat, what infiltrated muscle moves towards

    def rows(self, index: torch.Tensor) -> Contrast:
        """The contrasts of images ``index`` (e.g. a thick slice's for its partners)."""
        return Contrast(*(t[index] for t in (self.rho, self.fat_fraction, self.a, self.b, self.unit_rho,
                                             self.regime, self.severity, self.fat_rho)))


def _draw_contrast(rng: torch.Generator, batch: int, config: SynthesisConfig, device: torch.device) -> Contrast:
    """One contrast per image, drawn from ``config.regimes`` (vectorised over the batch)."""
    slots, n_muscles = N_TISSUE_SLOTS, N_TISSUE_SLOTS - MUSCLE_BASE
    regime = torch.randint(0, len(config.regimes), (batch,), generator=rng, device=device)
    table = torch.tensor([_REGIME_MEANS[r] for r in config.regimes], device=device)[regime]  # (B, 7)
    air, fat, skin, muscle, cortex, marrow, vessel = (table * uniform_draws(rng, 7 * batch, 0.8, 1.2, device)
                                                      .view(batch, 7)).unbind(1)
    rho = torch.zeros(batch, slots, device=device)
    rho[:, int(Tissue.BACKGROUND)] = air * 0.5
    rho[:, int(Tissue.SKIN)] = skin
    rho[:, int(Tissue.SUBCUTANEOUS_FAT)] = fat
    rho[:, int(Tissue.FASCIA)] = (fat + muscle) / 2
    rho[:, int(Tissue.INTERMUSCULAR_FAT)] = fat * uniform_draws(rng, batch, 0.8, 1.0, device)
    rho[:, int(Tissue.CORTICAL_BONE)] = cortex
    rho[:, int(Tissue.MARROW)] = marrow
    rho[:, int(Tissue.NEUROVASCULAR)] = vessel
    rho[:, int(Tissue.MUSCLE)] = muscle * uniform_draws(rng, batch, 0.88, 1.12, device)
    fraction = torch.zeros(batch, slots, device=device)
    fraction[:, :len(_FAT_FRACTION)] = torch.tensor(_FAT_FRACTION, device=device)
    muscles = muscle[:, None] * uniform_draws(rng, batch * n_muscles, 0.88, 1.12, device).view(batch, n_muscles)
    muscle_fraction = MUSCLE_FAT_FRACTION * uniform_draws(rng, batch * n_muscles, 0.5, 1.5, device).view(batch, n_muscles)
    rho[:, MUSCLE_BASE:] = muscles
    fraction[:, MUSCLE_BASE:] = muscle_fraction
    # Fat replaces part of some muscles (neuromuscular disease); _render moves each pixel's intensity
    # and fat fraction towards fat's by the muscle's severity, patchily.
    infiltrated = torch.rand(batch, 1, generator=rng, device=device) < config.p_infiltration
    affected_share = uniform_draws(rng, batch, *config.infiltration_affected, device)
    affected = torch.rand(batch, n_muscles, generator=rng, device=device) < affected_share[:, None]
    severity = torch.zeros(batch, slots, device=device)
    severity[:, MUSCLE_BASE:] = (torch.rand(batch, n_muscles, generator=rng, device=device) ** 1.5
                                 * config.infiltration_max * (infiltrated & affected))
    # Unlabelled interior: mostly fat (septa, fat pads), sometimes muscle the source did not label.
    hole_fat = torch.rand(batch, 2, generator=rng, device=device) < 0.65
    rho[:, [HOLE, HOLE_LARGEST]] = torch.where(hole_fat, (fat * 0.9)[:, None], muscle[:, None])
    fraction[:, [HOLE, HOLE_LARGEST]] = torch.where(hole_fat, 0.88, MUSCLE_FAT_FRACTION)
    random = torch.tensor([r == "random" for r in config.regimes], device=device)[regime]
    rho = torch.where(random[:, None], torch.rand(batch, slots, generator=rng, device=device), rho)
    signal = torch.tensor([_DIXON_SIGNAL.get(r, (1.0, 0.0, 0.0)) for r in config.regimes], device=device)[regime]
    return Contrast(rho, fraction, signal[:, 0], signal[:, 1], signal[:, 2], regime, severity,
                    rho[:, int(Tissue.SUBCUTANEOUS_FAT)].clone())


def _infiltrate(rho: torch.Tensor, fraction: torch.Tensor, index: torch.Tensor, contrast: Contrast,
                rng: torch.Generator, config: SynthesisConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fat infiltration of muscle pixels: ρ and fat fraction (each (B, 1, H, W)) move towards fat's
    by the pixel's severity, the muscle's mean severity modulated by a smooth random field with
    features about ``config.infiltration_patch_px`` across. ``index``: (B, H·W) tissue slots."""
    batch, _, h, w = rho.shape
    mean = torch.gather(contrast.severity, 1, index).view(batch, 1, h, w)
    grid = max(4, round(max(h, w) / config.infiltration_patch_px))
    patches = smooth_field(rng, batch, (h, w), grid, rho.device)
    severity = (mean * (1 + config.infiltration_patchiness * patches)).clamp(0.0, 1.0)
    rho = rho + (contrast.fat_rho.view(-1, 1, 1, 1) - rho) * severity
    fraction = fraction + (0.9 - fraction) * severity
    return rho, fraction


def _render(tissue: torch.Tensor, contrast: Contrast, rng: torch.Generator, config: SynthesisConfig) -> torch.Tensor:
    """(B, 1, H, W) noiseless image: each tissue's signal with a mild multiplicative texture.

    The fat fraction is blurred first (partial volume), so opposed-phase images cancel to dark rims
    one or two pixels wide wherever fat meets water."""
    batch, h, w = tissue.shape
    index = tissue.view(batch, -1).clamp(max=N_TISSUE_SLOTS - 1)
    rho = torch.gather(contrast.rho, 1, index).view(batch, 1, h, w)
    fraction = torch.gather(contrast.fat_fraction, 1, index).view(batch, 1, h, w)
    infiltrated = torch.nonzero(contrast.severity.amax(1) > 0)[:, 0]
    if infiltrated.numel():
        rho[infiltrated], fraction[infiltrated] = _infiltrate(
            rho[infiltrated], fraction[infiltrated], index[infiltrated], contrast.rows(infiltrated), rng, config)
    sigma = uniform_draws(rng, batch, *config.partial_volume_px, tissue.device)
    dixon = torch.nonzero(contrast.b != 0)[:, 0]  # only these images see the fat fraction
    if dixon.numel():
        fraction[dixon] = gaussian_blur(fraction[dixon], sigma[dixon])
    unit = contrast.unit_rho.view(-1, 1, 1, 1)
    body = (tissue > 0)[:, None].float()
    rho = rho * (1 - unit) + body * unit
    image = rho * (contrast.a.view(-1, 1, 1, 1) + contrast.b.view(-1, 1, 1, 1) * fraction).abs()
    texture = smooth_field(rng, batch, (h, w), max(4, h // 6), tissue.device)
    amplitude = uniform_draws(rng, batch, 0.0, 0.12, tissue.device).view(-1, 1, 1, 1)
    return image * (1 + amplitude * texture)


def resolution_operator(factor: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n) matrices that acquire a row of ``n`` pixels at ``factor`` (B,) times coarser cells
    (each cell the mean of the pixels it covers: partial volume) and interpolate it back linearly.

    A factor of 1 gives the identity. Applied as ``M_rows @ image @ M_columns.T``: one batched
    product per axis, whatever the factors."""
    device = factor.device
    factor = factor.clamp(min=1.0).view(-1, 1, 1)
    cells = int(math.ceil(n / float(factor.min()))) + 1
    x = torch.arange(n, device=device, dtype=factor.dtype).view(1, 1, -1)
    low = torch.arange(cells, device=device, dtype=factor.dtype).view(1, -1, 1) * factor
    overlap = (torch.minimum(x + 1, low + factor) - torch.maximum(x, low)).clamp(min=0)  # (B, cells, n)
    acquire = overlap / overlap.sum(2, keepdim=True).clamp(min=1e-6)
    last = torch.ceil(n / factor.view(-1, 1)) - 1  # (B, 1) index of the last cell inside the row
    u = ((x.view(1, -1) + 0.5) / factor.view(-1, 1) - 0.5).clamp(min=0)  # (B, n) position in cells
    i0 = torch.minimum(torch.floor(u), last)
    i1 = torch.minimum(i0 + 1, last)
    t = (u - i0).clamp(0, 1)
    interpolate = torch.zeros(factor.shape[0], n, cells, device=device, dtype=factor.dtype)
    interpolate.scatter_add_(2, i0.long()[..., None], (1 - t)[..., None])
    interpolate.scatter_add_(2, i1.long()[..., None], t[..., None])
    return interpolate @ acquire


def _low_resolution(image: torch.Tensor, rng: torch.Generator, config: SynthesisConfig) -> torch.Tensor:
    """In-plane low resolution with partial volume: some images one axis 1.3-2.5 times coarser,
    some acquired at ``low_resolution_mm`` on both axes."""
    batch, _, h, w = image.shape
    device = image.device
    mode = torch.rand(batch, generator=rng, device=device)
    one_axis = mode < config.p_low_resolution
    both = (mode >= config.p_low_resolution) & (mode < config.p_low_resolution + config.p_low_resolution_acquisition)
    coarse = uniform_draws(rng, batch, 1.3, 2.5, device)
    rows_axis = torch.rand(batch, generator=rng, device=device) < 0.5
    acquired = uniform_draws(rng, batch, *config.low_resolution_mm, device) / config.spacing_mm
    ones = torch.ones(batch, device=device)
    factor_rows = torch.where(both, acquired, torch.where(one_axis & rows_axis, coarse, ones))
    factor_cols = torch.where(both, acquired, torch.where(one_axis & ~rows_axis, coarse, ones))
    if not bool((one_axis | both).any()):
        return image
    rows, cols = resolution_operator(factor_rows, h), resolution_operator(factor_cols, w)
    return (rows[:, None] @ image @ cols.transpose(1, 2)[:, None])


def _add_other_leg(tissue: torch.Tensor, rng: torch.Generator, config: SynthesisConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the leg's mirror image beside its medial side (larger columns) for some images.

    ``tissue`` (B, K, H0, W0): the slice and its thick-slice partners, shifted alike. The gap from
    the leg's medial edge is drawn from ``other_leg_gap_mm`` (0: touching). Returns the new codes
    and the (B, H0, W0) mask of the other leg's pixels in the slice itself (target: background)."""
    batch, _, h, w = tissue.shape
    device = tissue.device
    chosen = torch.rand(batch, generator=rng, device=device) < config.p_other_leg
    gap = uniform_draws(rng, batch, *config.other_leg_gap_mm, device) / config.spacing_mm
    placed = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    rows = torch.nonzero(chosen)[:, 0]
    if rows.numel() == 0:
        return tissue, placed
    legs = tissue[rows]
    columns = torch.arange(w, device=device)
    medial = torch.where(legs[:, 0].any(1), columns, -1).amax(1)  # last column holding the leg
    # The mirror image's medial edge lies at w - 1 - medial; shift it to medial + 1 + gap.
    shift = (2 * medial + 2 - w + gap[rows].round().long()).view(-1, 1, 1, 1)
    source = columns.view(1, 1, 1, -1) - shift
    mirrored = legs.flip(-1).gather(3, source.clamp(0, w - 1).expand(-1, legs.shape[1], h, -1))
    place = (source >= 0) & (source < w) & (legs == 0) & (mirrored > 0) & (medial >= 0).view(-1, 1, 1, 1)
    out = tissue.clone()
    out[rows] = torch.where(place, mirrored, legs)
    placed[rows] = place[:, 0]
    return out, placed


def _outside_field_of_view(rng: torch.Generator, batch: int, size: tuple[int, int], config: SynthesisConfig,
                           device: torch.device) -> torch.Tensor:
    """(B, h, w) bool: pixels beyond a field-of-view edge (one image side, 5-35 % of the image cut
    away) for a ``p_fov_cut`` share of images; nothing elsewhere."""
    h, w = size
    chosen = torch.rand(batch, generator=rng, device=device) < config.p_fov_cut
    side = torch.randint(0, 4, (batch,), generator=rng, device=device).view(-1, 1, 1)
    depth = uniform_draws(rng, batch, 0.05, 0.35, device).view(-1, 1, 1)
    yy = (torch.arange(h, device=device).view(1, -1, 1) + 0.5) / h
    xx = (torch.arange(w, device=device).view(1, 1, -1) + 0.5) / w
    cut = torch.where(side == 0, yy < depth, torch.where(side == 1, yy > 1 - depth,
                                                          torch.where(side == 2, xx < depth, xx > 1 - depth)))
    return cut & chosen.view(-1, 1, 1)


def _normalise(image: torch.Tensor, body: torch.Tensor, percentiles: tuple[float, float]) -> torch.Tensor:
    """Body percentiles to 0 and 1, clipped, as preprocessing does at inference (the whole image
    where there is no body)."""
    batch = image.shape[0]
    stride = max(1, image[0].numel() // 4096)  # a strided sample, as preprocessing takes
    flat = image.flatten(1)[:, ::stride].float()
    mask = body.flatten(1)[:, ::stride]
    inside = mask | ~mask.any(1, keepdim=True)
    q = torch.nanquantile(torch.where(inside, flat, float("nan")),
                          torch.tensor([percentiles[0] / 100, percentiles[1] / 100], device=image.device), dim=1)
    low, high = q[0].view(batch, 1, 1, 1), q[1].view(batch, 1, 1, 1)
    return ((image - low) / torch.clamp(high - low, min=1e-6)).clamp(*NORMALISED_RANGE)


def synthesise(tissue: torch.Tensor, target: torch.Tensor, complete: torch.Tensor, rng: torch.Generator,
               config: SynthesisConfig, neighbours: torch.Tensor | None = None,
               neighbour_weights: torch.Tensor | None = None,
               percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images for a batch of anatomy canvases.

    Args:
        tissue: (B, H0, W0) uint8 tissue codes (see :mod:`dafne_logic.training.harmonisation`).
        target: (B, H0, W0) uint8 target codes (model classes and group codes).
        complete: (B,) bool, anatomy that already has skin and fat.
        rng: generator on the tensors' device; the only source of randomness.
        neighbours: optional (B, K, H0, W0) tissue codes of slices around each one (all zeros where
            there is none), averaged in with ``neighbour_weights`` (B, K) to mimic thick slices
            (partial volume across z); the slice itself keeps ``1 - sum(weights)``.

    Returns:
        images (B, 1, h, w) float32 normalised like preprocessing, targets (B, h, w) int64.
    """
    device = tissue.device
    batch = tissue.shape[0]
    h, w = config.size
    k = 0 if neighbours is None else neighbours.shape[1]
    if k and (neighbour_weights is None or neighbour_weights.shape != (batch, k)):
        raise ValueError(f"{k} neighbours per slice need (B, {k}) neighbour weights")
    stack = tissue[:, None] if neighbours is None else torch.cat([tissue[:, None], neighbours.to(tissue.dtype)], 1)
    stack, other_leg = _add_other_leg(stack.long(), rng, config)
    target = torch.where(other_leg, 0, target.long())
    grid = spatial_grid(rng, batch, (tissue.shape[1], tissue.shape[2]), config, device)
    packed = torch.cat([stack, target[:, None]], 1).float()
    warped = F.grid_sample(packed, grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    # Only the partners that weigh something are rendered: (image b, partner j) is row j * B + b.
    weights = torch.zeros(batch, k, device=device) if neighbour_weights is None else neighbour_weights.to(device).float()
    used = torch.nonzero(weights.T.reshape(-1) > 0)[:, 0]
    owner = torch.cat([torch.arange(batch, device=device), used % batch])
    tissues = torch.cat([warped[:, 0], warped[:, 1:k + 1].transpose(0, 1).reshape(k * batch, h, w)[used]])
    targets = warped[:, k + 1]
    # Field-of-view cuts and empty slices: no tissue, no label.
    beyond_fov = _outside_field_of_view(rng, batch, (h, w), config, device)
    empty = torch.rand(batch, generator=rng, device=device) < config.p_empty
    gone = beyond_fov | empty.view(-1, 1, 1)
    tissues = tissues.masked_fill(gone[owner], 0)
    targets = targets.masked_fill(gone, 0)
    tissues = _complete_body(tissues, complete.to(device)[owner], rng, config)
    tissues = _bones(tissues, rng, config)
    contrast = _draw_contrast(rng, batch, config, device)
    rendered = _render(tissues, contrast.rows(owner), rng, config)
    image = rendered[:batch]
    body = tissues[:batch] > 0
    if used.numel():
        partners = torch.zeros(k * batch, 1, h, w, device=device)
        partners[used] = rendered[batch:]
        mix = weights.T.reshape(k, batch, 1, 1, 1)
        image = image * (1 - mix.sum(0)) + (partners.view(k, batch, 1, h, w) * mix).sum(0)
    poor = torch.tensor([r == "fs_poor" for r in config.regimes], device=device)[contrast.regime]
    fat_fraction_map = contrast.unit_rho > 0  # quantitative maps carry no bias field
    amplitude = uniform_draws(rng, batch, 0, config.bias, device) * ~fat_fraction_map
    bias = smooth_field(rng, batch, (h, w), 4, device) * amplitude.view(-1, 1, 1, 1)
    image = image * torch.exp(bias)
    sigma_blur = torch.where(poor, uniform_draws(rng, batch, *config.poor_blur_px, device),
                             uniform_draws(rng, batch, 0, config.blur_px, device))
    image = gaussian_blur(image, sigma_blur)
    image = _low_resolution(image, rng, config)
    peak = image.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    peak = torch.where(empty.view(-1, 1, 1, 1), uniform_draws(rng, batch, 0.02, 0.5, device).view(-1, 1, 1, 1), peak)
    noise = torch.where(poor, uniform_draws(rng, batch, *config.poor_noise, device),
                        uniform_draws(rng, batch, *config.noise, device))
    sigma = noise.view(-1, 1, 1, 1) * peak
    real = image + sigma * torch.randn(image.shape, generator=rng, device=device)
    imaginary = sigma * torch.randn(image.shape, generator=rng, device=device)
    image = torch.sqrt(real ** 2 + imaginary ** 2)  # Rician magnitude noise
    gamma = torch.exp(config.gamma_log_sd * torch.randn(batch, generator=rng, device=device)).view(-1, 1, 1, 1)
    image = (image / image.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)) ** gamma
    image = _normalise(image, body, percentiles)
    # A slice beyond the body is normalised with the volume's body range at inference, so its noise
    # stays dim: scale the empty images' normalised noise down by a random factor.
    dim = torch.where(empty, uniform_draws(rng, batch, 0.05, 0.6, device), torch.ones(batch, device=device))
    image = torch.where(empty.view(-1, 1, 1, 1), image * dim.view(-1, 1, 1, 1), image)
    # Beyond the field of view nothing was acquired: preprocessing fills crops there with air.
    image = image.masked_fill(beyond_fov[:, None], 0.0)
    return image.float(), targets
