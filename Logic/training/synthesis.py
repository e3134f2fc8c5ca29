"""Label-to-image synthesis: random MR-like images from per-leg anatomy (SynthSeg-style).

Given batches of :class:`~dafne_logic.training.harmonisation.LegSlice` canvases (a *tissue* map and a
*target* map), :func:`synthesise` returns network inputs and targets, in torch, batched, on CPU or
CUDA, fully determined by one ``torch.Generator``:

1. **Spatial**: random affine (rotation, anisotropic scale, shear, shift) plus a smooth elastic
   field, applied to both maps with nearest-neighbour sampling, cropped to the output size.
2. **Tissue completion** (label maps carry muscles only): the body outline is a smoothed,
   thresholded copy of the muscle compartment grown by a random, angle-varying subcutaneous fat
   thickness, with a skin rim; the largest unlabelled hole inside the compartment (usually the
   femur or tibia) becomes bone with cortex and marrow; the other holes become intermuscular fat,
   or unlabelled muscle.
3. **Intensities** per tissue, drawn per image from a contrast regime: T1-, T2-, PD-, Dixon water-,
   Dixon fat-, STIR-like, or uniformly random (SynthSeg); per-muscle jitter and, for some images,
   fat infiltration of some muscles (as in neuromuscular disease) with marbled texture.
4. **Acquisition**: partial volume with the neighbouring slice (thick slices), multiplicative bias
   field, Gaussian blur and in-plane low resolution, Rician noise, gamma.
5. **Normalisation** as :mod:`dafne_logic.core.preprocessing` does it: the body's 0.5–99.5 percentiles
   map to 0 and 1, clipped to (-0.1, 1.1).

Canvases are in the network's orientation (the left leg already mirrored), so there is no random
left/right flip here: mirroring happened when the left leg was cut (see harmonisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dafne_logic.core.preprocessing import NORMALISED_RANGE
from dafne_logic.phantoms.anatomy import Tissue
from dafne_logic.training.harmonisation import BONE, HOLE, HOLE_LARGEST, MUSCLE_BASE, LegSlice

REGIMES = ("t1", "t2", "pd", "water", "fat", "stir", "random")

# Mean intensities (relative) of air, fat, skin, muscle, cortex, marrow, vessels per regime.
_REGIME_MEANS = {
    "t1": (0.02, 0.90, 0.55, 0.32, 0.04, 0.85, 0.20),
    "t2": (0.02, 0.75, 0.45, 0.22, 0.03, 0.65, 0.80),
    "pd": (0.02, 0.85, 0.60, 0.48, 0.05, 0.80, 0.60),
    "water": (0.02, 0.08, 0.35, 0.60, 0.03, 0.10, 0.75),
    "fat": (0.02, 0.90, 0.45, 0.07, 0.03, 0.85, 0.05),
    "stir": (0.02, 0.06, 0.35, 0.32, 0.03, 0.08, 0.85),
}
N_TISSUE_SLOTS = 80  # compact tissue indices: 0..MUSCLE_BASE-1 fixed tissues, then muscles/groups


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges of the random draws. Sizes in pixels of the model spacing."""

    size: tuple[int, int] = (160, 160)  # output (H, W)
    regimes: tuple[str, ...] = REGIMES
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.2)  # isotropic part; anisotropy adds ±10 %
    shear: float = 0.08
    shift: float = 0.08  # fraction of the output size
    elastic_px: float = 4.0  # max displacement of the smooth elastic field
    fat_thickness_px: tuple[float, float] = (3.0, 30.0)
    p_bone: float = 0.8  # the largest hole drawn as bone
    p_infiltration: float = 0.3
    p_thick_slice: float = 0.4
    bias: float = 0.5  # max log amplitude of the bias field
    blur_px: float = 1.2
    p_low_resolution: float = 0.3
    noise: tuple[float, float] = (0.005, 0.06)
    gamma_log_sd: float = 0.25


def _uniform(rng: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
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


def _spatial_grid(rng: torch.Generator, batch: int, canvas: tuple[int, int], config: SynthesisConfig,
                  device: torch.device) -> torch.Tensor:
    """(B, h, w, 2) sampling grid (normalised canvas coordinates) of a random affine + elastic map."""
    h, w = config.size
    angle = _uniform(rng, batch, -1, 1, device) * math.radians(config.rotation_deg)
    zoom = _uniform(rng, batch, *config.scale, device)
    aniso = _uniform(rng, batch, 0.9, 1.1, device)
    sx, sy = zoom * aniso, zoom / aniso
    shear = _uniform(rng, batch, -config.shear, config.shear, device)
    shift = _uniform(rng, 2 * batch, -config.shift, config.shift, device).view(batch, 2) * 2
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
    amplitude = _uniform(rng, batch, 0, config.elastic_px, device).view(batch, 1, 1, 1)
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
    thickness = _uniform(rng, batch, *config.fat_thickness_px, device)
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
    """Cortex and marrow inside labelled bones and (with probability ``p_bone``) the largest hole."""
    batch = tissue.shape[0]
    device = tissue.device
    as_bone = torch.rand(batch, generator=rng, device=device) < config.p_bone
    bone = (tissue == BONE) | ((tissue == HOLE_LARGEST) & as_bone.view(-1, 1, 1))
    out = tissue.clone()
    for b in range(batch):
        if bone[b].any():
            cortex_px = 1 + int(torch.randint(0, 3, (1,), generator=rng, device=device))
            inner = _erode(bone[b][None, None], cortex_px)[0, 0]
            out[b][bone[b]] = int(Tissue.CORTICAL_BONE)
            out[b][inner] = int(Tissue.MARROW)
    return out


def _tissue_means(rng: torch.Generator, batch: int, config: SynthesisConfig, device: torch.device) -> torch.Tensor:
    """(B, N_TISSUE_SLOTS) mean intensity of every tissue code slot for each image."""
    means = torch.zeros(batch, N_TISSUE_SLOTS, device=device)
    regime_index = torch.randint(0, len(config.regimes), (batch,), generator=rng, device=device)
    jitter = lambda n: _uniform(rng, n, 0.8, 1.2, device)  # noqa: E731 - a local shorthand
    for b in range(batch):
        regime = config.regimes[int(regime_index[b])]
        if regime == "random":
            means[b] = torch.rand(N_TISSUE_SLOTS, generator=rng, device=device)
            continue
        air, fat, skin, muscle, cortex, marrow, vessel = (
            v * f for v, f in zip(_REGIME_MEANS[regime], jitter(7).tolist()))
        row = means[b]
        row[int(Tissue.BACKGROUND)] = air * 0.5
        row[int(Tissue.SKIN)] = skin
        row[int(Tissue.SUBCUTANEOUS_FAT)] = fat
        row[int(Tissue.FASCIA)] = (fat + muscle) / 2
        row[int(Tissue.INTERMUSCULAR_FAT)] = fat * float(_uniform(rng, 1, 0.8, 1.0, device))
        row[int(Tissue.CORTICAL_BONE)] = cortex
        row[int(Tissue.MARROW)] = marrow
        row[int(Tissue.NEUROVASCULAR)] = vessel
        muscles = muscle * _uniform(rng, N_TISSUE_SLOTS - MUSCLE_BASE, 0.88, 1.12, device)
        if float(torch.rand(1, generator=rng, device=device)) < config.p_infiltration:
            # Fat replaces part of some muscles: intensity moves towards fat's.
            severity = torch.rand(N_TISSUE_SLOTS - MUSCLE_BASE, generator=rng, device=device) ** 2 * 0.7
            affected = torch.rand(N_TISSUE_SLOTS - MUSCLE_BASE, generator=rng, device=device) < 0.5
            muscles = muscles + (fat - muscles) * severity * affected
        row[MUSCLE_BASE:] = muscles
        row[int(Tissue.MUSCLE)] = muscle * float(_uniform(rng, 1, 0.88, 1.12, device))
        # Unlabelled interior: mostly fat (septa, fat pads), sometimes muscle the source did not label.
        for slot in (HOLE, HOLE_LARGEST):
            row[slot] = fat * 0.9 if float(torch.rand(1, generator=rng, device=device)) < 0.65 else muscle
    return means


def _render(tissue: torch.Tensor, means: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) noiseless image: each tissue's mean with a mild multiplicative texture."""
    batch, h, w = tissue.shape
    image = torch.gather(means, 1, tissue.view(batch, -1).clamp(max=N_TISSUE_SLOTS - 1)).view(batch, 1, h, w)
    texture = smooth_field(rng, batch, (h, w), max(4, h // 6), tissue.device)
    amplitude = _uniform(rng, batch, 0.0, 0.12, tissue.device).view(-1, 1, 1, 1)
    return image * (1 + amplitude * texture)


def _normalise(image: torch.Tensor, body: torch.Tensor, percentiles: tuple[float, float]) -> torch.Tensor:
    """Body percentiles to 0 and 1, clipped, as preprocessing does at inference."""
    out = torch.empty_like(image)
    for b in range(image.shape[0]):
        values = image[b, 0][body[b]] if body[b].any() else image[b, 0].flatten()
        values = values[:: max(1, values.numel() // 4096)]  # a strided sample, as preprocessing takes
        q = torch.quantile(values.float(), torch.tensor([percentiles[0] / 100, percentiles[1] / 100],
                                                        device=image.device))
        out[b] = (image[b] - q[0]) / torch.clamp(q[1] - q[0], min=1e-6)
    return out.clamp(*NORMALISED_RANGE)


def synthesise(tissue: torch.Tensor, target: torch.Tensor, complete: torch.Tensor, rng: torch.Generator,
               config: SynthesisConfig, neighbour: torch.Tensor | None = None,
               percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images for a batch of anatomy canvases.

    Args:
        tissue: (B, H0, W0) uint8 tissue codes (see :mod:`dafne_logic.training.harmonisation`).
        target: (B, H0, W0) uint8 target codes (model classes and group codes).
        complete: (B,) bool, anatomy that already has skin and fat.
        rng: generator on the tensors' device; the only source of randomness.
        neighbour: optional (B, H0, W0) tissue codes of the adjacent slice (all zeros where there
            is none), mixed in to mimic thick slices.

    Returns:
        images (B, 1, h, w) float32 normalised like preprocessing, targets (B, h, w) int64.
    """
    device = tissue.device
    batch = tissue.shape[0]
    h, w = config.size
    grid = _spatial_grid(rng, batch, tuple(tissue.shape[1:]), config, device)
    stacked = [tissue, target] + ([neighbour] if neighbour is not None else [])
    packed = torch.stack(stacked, 1).float()
    warped = F.grid_sample(packed, grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    tissues = warped[:, 0]
    targets = warped[:, 1]
    has_neighbour = torch.zeros(batch, dtype=torch.bool, device=device)
    if neighbour is not None:
        has_neighbour = warped[:, 2].flatten(1).any(1)
        tissues = torch.cat([tissues, warped[:, 2]])
        complete = torch.cat([complete, complete])
    tissues = _complete_body(tissues, complete.to(device), rng, config)
    tissues = _bones(tissues, rng, config)
    means = _tissue_means(rng, batch, config, device)
    if neighbour is not None:
        means = torch.cat([means, means])
    rendered = _render(tissues, means, rng)
    image = rendered[:batch]
    body = tissues[:batch] > 0
    if neighbour is not None:
        weight = _uniform(rng, batch, 0.0, 0.45, device)
        weight = weight * (torch.rand(batch, generator=rng, device=device) < config.p_thick_slice) * has_neighbour
        image = image * (1 - weight.view(-1, 1, 1, 1)) + rendered[batch:] * weight.view(-1, 1, 1, 1)
    bias = smooth_field(rng, batch, (h, w), 4, device) * _uniform(rng, batch, 0, config.bias, device).view(-1, 1, 1, 1)
    image = image * torch.exp(bias)
    image = gaussian_blur(image, _uniform(rng, batch, 0, config.blur_px, device))
    for b in range(batch):
        if float(torch.rand(1, generator=rng, device=device)) < config.p_low_resolution:
            factor = float(_uniform(rng, 1, 1.3, 2.5, device))
            axis_rows = bool(torch.rand(1, generator=rng, device=device) < 0.5)
            low = (max(8, int(h / factor)), w) if axis_rows else (h, max(8, int(w / factor)))
            image[b:b + 1] = F.interpolate(F.interpolate(image[b:b + 1], size=low, mode="area"),
                                           size=(h, w), mode="bilinear", align_corners=False)
    peak = image.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    sigma = _uniform(rng, batch, *config.noise, device).view(-1, 1, 1, 1) * peak
    real = image + sigma * torch.randn(image.shape, generator=rng, device=device)
    imaginary = sigma * torch.randn(image.shape, generator=rng, device=device)
    image = torch.sqrt(real ** 2 + imaginary ** 2)  # Rician magnitude noise
    gamma = torch.exp(config.gamma_log_sd * torch.randn(batch, generator=rng, device=device)).view(-1, 1, 1, 1)
    image = (image / image.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)) ** gamma
    return _normalise(image, body, percentiles).float(), targets


@dataclass
class AnatomyBank:
    """All training anatomy as stacked canvases, plus how to draw from it.

    Attributes:
        tissue, target: (S, H0, W0) uint8.
        complete: (S,) bool.
        neighbour: (S,) int64 index of the adjacent slice of the same leg (-1 when none).
        weight: (S,) float64 sampling weight (each source file weighs the same in total).
        subjects: subject id of each slice.
    """

    tissue: torch.Tensor
    target: torch.Tensor
    complete: torch.Tensor
    neighbour: torch.Tensor
    weight: torch.Tensor
    subjects: list[str]

    @classmethod
    def from_sources(cls, sources: list[list[LegSlice]], max_neighbour_mm: float = 6.0,
                     source_weights: list[float] | None = None) -> AnatomyBank:
        """Stack the slices of several sources (each the output of one label map)."""
        weights = list(source_weights) if source_weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError("one weight per source, please")
        kept = [(s, w) for s, w in zip(sources, weights) if s]
        sources, weights = [s for s, _ in kept], [w for _, w in kept]
        if not sources:
            raise ValueError("no anatomy slices to train on")
        slices = [s for source in sources for s in source]
        neighbour = np.full(len(slices), -1, dtype=np.int64)
        weight = np.zeros(len(slices))
        start = 0
        for k, source in enumerate(sources):
            by_leg: dict[tuple[str, str], list[int]] = {}
            for i, s in enumerate(source):
                by_leg.setdefault((s.subject, s.side), []).append(start + i)
            for indices in by_leg.values():
                indices.sort(key=lambda i: slices[i].z_mm)
                for a, b in zip(indices, indices[1:]):
                    if abs(slices[a].z_mm - slices[b].z_mm) <= max_neighbour_mm:
                        neighbour[a] = b
            weight[start:start + len(source)] = weights[k] / len(source)
            start += len(source)
        return cls(
            tissue=torch.from_numpy(np.stack([s.tissue for s in slices])),
            target=torch.from_numpy(np.stack([s.target for s in slices])),
            complete=torch.tensor([s.complete for s in slices]),
            neighbour=torch.from_numpy(neighbour),
            weight=torch.from_numpy(weight / weight.sum()),
            subjects=[s.subject for s in slices],
        )

    def __len__(self) -> int:
        return self.tissue.shape[0]


class SynthesisSampler:
    """``sampler(generator, batch) -> (images, targets)`` for :func:`dafne_logic.training.trainer.train_model`.

    Draws slices by weight with the (CPU) ``generator``, then seeds a generator on ``device`` from
    it, so a run is reproducible and resumable on either device."""

    def __init__(self, bank: AnatomyBank, config: SynthesisConfig, device: str | torch.device = "cpu",
                 percentiles: tuple[float, float] = (0.5, 99.5)):
        self.bank = bank
        self.config = config
        self.device = torch.device(device)
        self.percentiles = percentiles
        self._tissue = bank.tissue.to(self.device)
        self._target = bank.target.to(self.device)
        self._complete = bank.complete.to(self.device)

    def __call__(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.multinomial(self.bank.weight, batch, replacement=True, generator=generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        rng = torch.Generator(self.device).manual_seed(seed)
        nb = self.bank.neighbour[index].to(self.device)
        neighbour = self._tissue[nb.clamp(min=0)] * (nb >= 0).view(-1, 1, 1)
        index = index.to(self.device)
        return synthesise(self._tissue[index], self._target[index], self._complete[index], rng, self.config,
                          neighbour=neighbour, percentiles=self.percentiles)


def dice_by_class(prediction: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes - 1,) Dice of classes 1..N between predicted classes and targets, pooled over the
    batch; pixels whose target is a group code (>= n_classes) are ignored; NaN where a class is in
    neither."""
    known = target < n_classes
    scores = torch.full((n_classes - 1,), float("nan"))
    for c in range(1, n_classes):
        p, t = (prediction == c) & known, target == c
        total = int(p.sum() + t.sum())
        if total:
            scores[c - 1] = 2 * float((p & t).sum()) / total
    return scores


def synthetic_validation(bank: AnatomyBank, config: SynthesisConfig, class_names: list[str], samples: int = 32,
                         seed: int = 12345, regimes: tuple[str, ...] | None = None, batch_size: int = 8,
                         device: str | torch.device = "cpu",
                         percentiles: tuple[float, float] = (0.5, 99.5),
                         unlabelled: frozenset[int] = frozenset()) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A ``validate(network) -> {name: Dice, "mean_dice": ...}`` callable on images synthesised from
    ``bank`` with a fixed seed (the same images at every call). ``class_names`` are the muscles;
    classes in ``unlabelled`` (muscles the sources never label) get NaN and stay out of the mean."""
    from dataclasses import replace

    n_classes = len(class_names) + 1
    sampler = SynthesisSampler(bank, replace(config, regimes=regimes or config.regimes), device, percentiles)
    generator = torch.Generator().manual_seed(seed)
    batches = [sampler(generator, batch_size) for _ in range(max(1, samples // batch_size))]

    def validate(network: torch.nn.Module) -> dict[str, float]:
        predictions = []
        with torch.no_grad():
            for images, _ in batches:
                predictions.append(network(images.to(next(network.parameters()).device)).argmax(1).cpu())
        scores = dice_by_class(torch.cat(predictions), torch.cat([t.cpu() for _, t in batches]), n_classes)
        scores[[c - 1 for c in sorted(unlabelled)]] = float("nan")
        result = {name: float(s) for name, s in zip(class_names, scores)}
        valid = scores[~torch.isnan(scores)]
        result["mean_dice"] = float(valid.mean()) if valid.numel() else float("nan")
        return result

    return validate


class SliceSampler:
    """Augmented slices of real, preprocessed image/label crops (the ``--pairs`` path).

    Same spatial draws as synthesis (affine + elastic), then a bias field, gamma and Rician noise
    on the real intensities. Slices without any labelled muscle are not drawn."""

    def __init__(self, crops: list[tuple[np.ndarray, np.ndarray]], config: SynthesisConfig,
                 device: str | torch.device = "cpu"):
        slices = [(image[k], target[k]) for image, target in crops for k in range(image.shape[0]) if target[k].any()]
        if not slices:
            raise ValueError("no labelled slices to train on")
        height = max(s[0].shape[0] for s in slices)
        width = max(s[0].shape[1] for s in slices)
        self.canvas = (height, width)
        images = torch.full((len(slices), height, width), float(NORMALISED_RANGE[0]))
        targets = torch.zeros((len(slices), height, width), dtype=torch.uint8)
        for k, (image, target) in enumerate(slices):
            y, x = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
            images[k, y:y + image.shape[0], x:x + image.shape[1]] = torch.from_numpy(image)
            targets[k, y:y + image.shape[0], x:x + image.shape[1]] = torch.from_numpy(target)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = targets.to(self.device)
        self.config = config

    def __len__(self) -> int:
        return self.images.shape[0]

    def __call__(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(self), (batch,), generator=generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        rng = torch.Generator(self.device).manual_seed(seed)
        index = index.to(self.device)
        grid = _spatial_grid(rng, batch, self.canvas, self.config, self.device)
        image = F.grid_sample(self.images[index][:, None], grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        target = F.grid_sample(self.targets[index][:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
        h, w = self.config.size
        bias = smooth_field(rng, batch, (h, w), 4, self.device) * _uniform(rng, batch, 0, self.config.bias / 2,
                                                                           self.device).view(-1, 1, 1, 1)
        image = image.clamp(0, 1) * torch.exp(bias)
        gamma = torch.exp(self.config.gamma_log_sd * torch.randn(batch, generator=rng, device=self.device))
        image = image.clamp(min=0) ** gamma.view(-1, 1, 1, 1)
        sigma = _uniform(rng, batch, 0, self.config.noise[1] / 2, self.device).view(-1, 1, 1, 1)
        image = image + sigma * torch.randn(image.shape, generator=rng, device=self.device)
        return image.clamp(*NORMALISED_RANGE).float(), target
