"""Where training batches come from: an anatomy bank drawn through the synthesis, or real crops.

- :class:`AnatomyBank` stacks every training leg slice (tissue and target canvases) with its
  position along the leg and a sampling weight per source.
- :class:`SynthesisSampler` draws slices from a bank by weight and synthesises images from them
  (:func:`dafne_logic.training.synthesis.synthesise`).
- :class:`SliceSampler` augments real, preprocessed image/label crops (the ``--pairs`` path).

Each is a ``sampler(generator, batch) -> (images (B, 1, h, w) float32, targets (B, h, w) int64)``
for :func:`dafne_logic.training.trainer.train_model`, fully determined by the CPU ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dafne_logic.core.errors import InputError
from dafne_logic.core.preprocessing import NORMALISED_RANGE
from dafne_logic.training.harmonisation import LegSlice
from dafne_logic.training.synthesis import SynthesisConfig, smooth_field, spatial_grid, synthesise, uniform_draws


@dataclass
class AnatomyBank:
    """All training anatomy as stacked canvases, plus how to draw from it.

    Attributes:
        tissue, target: (S, H0, W0) uint8.
        complete: (S,) bool.
        z_mm: (S,) float64 slice position along the leg.
        leg: (S,) int64 one id per leg of each source (subject and side).
        weight: (S,) float64 sampling weight (each source weighs its ``source_weights`` share in total).
        subjects: subject id of each slice.
    """

    tissue: torch.Tensor
    target: torch.Tensor
    complete: torch.Tensor
    z_mm: torch.Tensor
    leg: torch.Tensor
    weight: torch.Tensor
    subjects: list[str]

    @classmethod
    def from_sources(cls, sources: list[list[LegSlice]], source_weights: list[float] | None = None) -> AnatomyBank:
        """Stack the slices of several sources (each the output of one label map)."""
        weights = list(source_weights) if source_weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError("one weight per source, please")
        kept = [(s, w) for s, w in zip(sources, weights, strict=True) if s]
        sources, weights = [s for s, _ in kept], [w for _, w in kept]
        if not sources:
            raise ValueError("no anatomy slices to train on")
        slices = [s for source in sources for s in source]
        legs: dict[tuple[int, str, str], int] = {}
        leg = [legs.setdefault((k, s.subject, s.side), len(legs)) for k, source in enumerate(sources) for s in source]
        weight = np.concatenate([np.full(len(source), w / len(source)) for source, w in zip(sources, weights, strict=True)])
        return cls(
            tissue=torch.from_numpy(np.stack([s.tissue for s in slices])),
            target=torch.from_numpy(np.stack([s.target for s in slices])),
            complete=torch.tensor([s.complete for s in slices]),
            z_mm=torch.tensor([s.z_mm for s in slices], dtype=torch.float64),
            leg=torch.tensor(leg, dtype=torch.int64),
            weight=torch.from_numpy(weight / weight.sum()),
            subjects=[s.subject for s in slices],
        )

    def __len__(self) -> int:
        return self.tissue.shape[0]

    def slices_at(self, index: torch.Tensor, offset_mm: torch.Tensor, within_mm: torch.Tensor) -> torch.Tensor:
        """(B,) index of the slice of the same leg nearest to ``z_mm[index] + offset_mm`` (never the
        slice itself), or -1 where none lies within ``within_mm`` of the slice. Vectorised: one
        sorted search over (leg, z) keys."""
        key = self.leg.double() * 1e6 + self.z_mm
        order = torch.argsort(key)
        ordered = key[order]
        query = key[index] + offset_mm.double()
        position = torch.searchsorted(ordered, query)
        candidates = torch.stack([position - 1, position]).clamp(0, len(self) - 1)  # (2, B)
        found = order[candidates]
        distance = (ordered[candidates] - query).abs()
        distance[(found == index) | (self.leg[found] != self.leg[index])] = float("inf")
        best = found.gather(0, distance.argmin(0, keepdim=True))[0]
        usable = torch.isfinite(distance.min(0).values) & (
            (self.z_mm[best] - self.z_mm[index]).abs() <= within_mm.double())
        return torch.where(usable, best, -1)


class SynthesisSampler:
    """``sampler(generator, batch) -> (images, targets)`` for :func:`dafne_logic.training.trainer.train_model`.

    Draws slices by weight with the (CPU) ``generator``, for thick-slice images also the slices a
    third of the thickness above and below (each weighs a third of the slab), then seeds a
    generator on ``device`` from it, so a run is reproducible and resumable on either device."""

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
        thick = torch.rand(batch, generator=generator) < self.config.p_thick_slice
        low, high = self.config.slice_thickness_mm
        thickness = low + (high - low) * torch.rand(batch, generator=generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        rng = torch.Generator(self.device).manual_seed(seed)
        within = thickness / 2 + 1.0
        partners = torch.stack([self.bank.slices_at(index, thickness / 3, within),
                                self.bank.slices_at(index, -thickness / 3, within)], 1)  # (B, 2)
        valid = (partners >= 0) & thick[:, None]
        partners, valid = partners.to(self.device), valid.to(self.device)
        neighbours = self._tissue[partners.clamp(min=0)] * valid[..., None, None]
        index = index.to(self.device)
        return synthesise(self._tissue[index], self._target[index], self._complete[index], rng, self.config,
                          neighbours=neighbours, neighbour_weights=valid.float() / 3, percentiles=self.percentiles)


class SliceSampler:
    """Augmented slices of real, preprocessed image/label crops (the ``--pairs`` path).

    Same spatial draws as synthesis (affine + elastic), then a bias field, gamma and Rician noise
    on the real intensities. Slices without any labelled muscle are not drawn."""

    def __init__(self, crops: list[tuple[np.ndarray, np.ndarray]], config: SynthesisConfig,
                 device: str | torch.device = "cpu"):
        slices = [(image[k], target[k]) for image, target in crops for k in range(image.shape[0]) if target[k].any()]
        if not slices:
            raise InputError("the training pairs hold no slice with a labelled muscle of the label table; check "
                             "their label maps and label tables")
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
        grid = spatial_grid(rng, batch, self.canvas, self.config, self.device)
        image = F.grid_sample(self.images[index][:, None], grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        target = F.grid_sample(self.targets[index][:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
        h, w = self.config.size
        bias = smooth_field(rng, batch, (h, w), 4, self.device) * uniform_draws(rng, batch, 0, self.config.bias / 2,
                                                                           self.device).view(-1, 1, 1, 1)
        image = image.clamp(0, 1) * torch.exp(bias)
        gamma = torch.exp(self.config.gamma_log_sd * torch.randn(batch, generator=rng, device=self.device))
        image = image.clamp(min=0) ** gamma.view(-1, 1, 1, 1)
        sigma = uniform_draws(rng, batch, 0, self.config.noise[1] / 2, self.device).view(-1, 1, 1, 1)
        image = image + sigma * torch.randn(image.shape, generator=rng, device=self.device)
        return image.clamp(*NORMALISED_RANGE).float(), target
