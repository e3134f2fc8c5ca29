"""Procedural thigh and calf phantoms: MR-like images with their exact muscle label maps.

:func:`make_phantom` = :func:`~dafne_logic.phantoms.anatomy.phantom_tissue_map` (geometry: tissue
classes and muscle labels) + :func:`render_contrast` (intensities: a per-tissue table for the
contrast regime, fat infiltration of muscle, partial volume, thick-slice blur, bias field, Rician
noise). Synthesis code that randomises intensities itself can use the tissue map directly.

Intensities are relative to the regime's reference tissue, which has intensity 1: muscle, except in
the fat regime (Dixon fat image, where muscle is nearly black), whose reference is fat. ``noise`` is
the Rician noise standard deviation as a fraction of that reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.phantoms.anatomy import Tissue, TissueMap, phantom_tissue_map

__all__ = ["CONTRASTS", "INTENSITIES", "DixonPhantom", "make_dixon_phantom", "make_phantom", "render_contrast",
           "to_image", "Tissue", "TissueMap", "phantom_tissue_map", "true_fat_fraction"]

# Per-tissue intensities, indexed by Tissue value:
# background, skin, subcutaneous fat, fascia, intermuscular fat, cortical bone, marrow, muscle, neurovascular
INTENSITIES: dict[str, np.ndarray] = {
    name: np.asarray(values, np.float32)
    for name, values in {
        # spin-echo T1: fat bright, muscle dark grey, flowing blood dark
        "t1": (0.0, 1.3, 3.0, 0.45, 2.9, 0.06, 2.7, 1.0, 0.35),
        # fast spin-echo T2: fat still bright, fluid in vessels and nerves bright, muscle dark
        "t2": (0.0, 1.5, 2.6, 0.4, 2.5, 0.06, 2.3, 1.0, 2.2),
        # Dixon water: fat dark, vessels bright
        "water": (0.0, 1.1, 0.12, 0.5, 0.15, 0.05, 0.18, 1.0, 1.6),
        # Dixon fat: only fat shows (reference intensity 1 = fat)
        "fat": (0.0, 0.25, 1.0, 0.1, 0.95, 0.03, 0.9, 0.08, 0.05),
        # proton density: little contrast between fat and muscle
        "pd": (0.0, 1.5, 1.9, 0.5, 1.85, 0.06, 1.8, 1.0, 0.6),
        # STIR: fat suppressed, fluid bright
        "stir": (0.0, 1.3, 0.1, 0.5, 0.12, 0.05, 0.15, 1.0, 2.0),
    }.items()
}
CONTRASTS: tuple[str, ...] = tuple(INTENSITIES)

_MUSCLE_VARIATION = 0.05  # relative SD of the intensity of each muscle around the table value
_PSF_SIGMA_PX = 0.5  # in-plane point spread (partial volume), pixels


def _reference(table: np.ndarray) -> float:
    """Muscle intensity, or fat intensity where muscle is nearly black (fat images)."""
    muscle, fat = float(table[Tissue.MUSCLE]), float(table[Tissue.SUBCUTANEOUS_FAT])
    return fat if muscle < 0.2 * fat else muscle


def render_contrast(tissues: np.ndarray, muscles: np.ndarray, contrast: str | np.ndarray,
                    rng: np.random.Generator, *, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    noise: float = 0.0, bias: float = 0.0, fat_infiltration: float = 0.0,
                    slice_thickness_mm: float | None = None) -> np.ndarray:
    """MR-like intensities (z, y, x) float32 for a tissue map.

    ``tissues`` (z, y, x) holds :class:`Tissue` values and ``muscles`` (z, y, x) volume labels
    (each muscle gets its own slight intensity offset and fat infiltration). ``contrast`` names a
    regime of :data:`INTENSITIES` or is a table of one intensity per tissue class. ``spacing`` is
    (x, y, z) mm. ``fat_infiltration`` (0..1) is the mean fraction of muscle replaced by fat, varying
    between muscles and in a smooth marbled pattern within each. ``slice_thickness_mm`` beyond the z
    spacing blurs along z; ``bias`` is the strength of a smooth multiplicative field (intensities
    scaled by ``exp(bias * f)`` with ``|f| <= 1``); ``noise`` the Rician noise SD relative to the
    reference intensity (see the module docstring).
    """
    table = _intensity_table(contrast)
    if tissues.shape != muscles.shape or tissues.ndim != 3:
        raise InputError(f"tissues {tissues.shape} and muscles {muscles.shape} must be two volumes of one shape")
    if not 0.0 <= fat_infiltration <= 1.0:
        raise InputError(f"fat_infiltration must lie in 0..1, not {fat_infiltration}")
    if noise < 0 or bias < 0:
        raise InputError("noise and bias must not be negative")
    if slice_thickness_mm is not None and not slice_thickness_mm > 0:
        raise InputError(f"slice thickness must be positive, not {slice_thickness_mm} mm")
    image = _clean_intensities(table, tissues, _draw_muscle_fat(tissues, muscles, rng, spacing, fat_infiltration))
    image = ndimage.gaussian_filter(image, (0.0, _PSF_SIGMA_PX, _PSF_SIGMA_PX), truncate=3.0)
    if slice_thickness_mm is not None:
        extra = max(slice_thickness_mm ** 2 - spacing[2] ** 2, 0.0) ** 0.5  # FWHM beyond the slice spacing
        if extra > 0:
            image = ndimage.gaussian_filter1d(image, extra / 2.3548 / spacing[2], axis=0, mode="nearest")
    if bias > 0:
        image *= np.exp(bias * _bias_field(rng, tissues.shape))
    if noise > 0:
        sigma = noise * _reference(table)
        real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
        imag = rng.standard_normal(image.shape, dtype=np.float32) * sigma
        image = np.hypot(real, imag)
    return image.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _MuscleFat:
    """What the phantom drew for its muscle voxels: a shade per muscle and the fat replacing muscle."""

    muscle: np.ndarray  # (z, y, x) bool, every muscle voxel (labelled or not)
    shade: np.ndarray  # (n_labels,) float32, intensity factor of each volume label (0 = unlabelled muscle)
    labels: np.ndarray  # (n_muscle_voxels,) volume label of each muscle voxel
    fraction: np.ndarray  # (n_muscle_voxels,) float32 in 0..1, share of each muscle voxel replaced by fat


def _draw_muscle_fat(tissues: np.ndarray, muscles: np.ndarray, rng: np.random.Generator,
                     spacing: tuple[float, float, float], fat_infiltration: float) -> _MuscleFat:
    """Each muscle (and the unlabelled muscle, label 0) its own shade and its own degree of fat."""
    muscle = tissues == Tissue.MUSCLE
    labels = muscles[muscle]
    n_labels = int(muscles.max()) + 1
    shade = (1.0 + rng.normal(0.0, _MUSCLE_VARIATION, n_labels)).astype(np.float32)
    fraction = np.zeros(labels.shape, np.float32)
    if fat_infiltration > 0:
        # Muscles differ in how affected they are; within one, fat runs in streaks along the fibres (z).
        per_muscle = np.clip(fat_infiltration * rng.lognormal(-0.15, 0.55, n_labels), 0.0, 0.95).astype(np.float32)
        marbling = _smooth_field(rng, tissues.shape, spacing, scale_mm=(25.0, 5.0, 5.0))
        fraction = np.clip(per_muscle[labels] * (1.0 + 0.6 * marbling[muscle]), 0.0, 1.0)
    return _MuscleFat(muscle, shade, labels, fraction)


def _clean_intensities(table: np.ndarray, tissues: np.ndarray, fat: _MuscleFat) -> np.ndarray:
    """Per-voxel intensities (z, y, x) float32 before blur, bias and noise: muscle shaded, then mixed with fat."""
    image = table[tissues]
    shaded = table[Tissue.MUSCLE] * fat.shade[fat.labels]
    image[fat.muscle] = shaded + fat.fraction * (table[Tissue.SUBCUTANEOUS_FAT] - shaded)
    return image


def _intensity_table(contrast: str | np.ndarray) -> np.ndarray:
    if isinstance(contrast, str):
        if contrast not in INTENSITIES:
            raise InputError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
        return INTENSITIES[contrast]
    table = np.asarray(contrast, np.float32)
    if table.shape != (len(Tissue),):
        raise InputError(f"an intensity table needs one value per tissue class ({len(Tissue)}), not {table.shape}")
    return table


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  scale_mm: tuple[float, float, float]) -> np.ndarray:
    """Zero-mean, unit-SD random field (z, y, x) with features about ``scale_mm`` (z, y, x) across.

    Drawn on a grid a quarter of the feature size and interpolated, so its cost barely depends on
    the image size.
    """
    steps = np.array([spacing[2], spacing[1], spacing[0]])
    coarse_step = np.maximum(np.asarray(scale_mm) / 4.0, steps)
    coarse_shape = np.ceil(np.array(shape) * steps / coarse_step).astype(int) + 2
    coarse = ndimage.gaussian_filter(rng.standard_normal(tuple(coarse_shape)), 1.5, mode="wrap")
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)
    grids = [np.arange(n) * (c - 1) / max(n - 1, 1) for n, c in zip(shape, coarse_shape, strict=True)]
    return _trilinear(coarse.astype(np.float32), grids)


def _trilinear(volume: np.ndarray, grids: list[np.ndarray]) -> np.ndarray:
    """Separable linear interpolation of ``volume`` at the outer product of per-axis coordinates."""
    out = volume
    for axis, coords in enumerate(grids):
        coords = np.clip(coords, 0, out.shape[axis] - 1)
        lo = np.minimum(np.floor(coords).astype(int), out.shape[axis] - 2) if out.shape[axis] > 1 else np.zeros(len(coords), int)
        frac = (coords - lo).astype(np.float32)
        a = np.take(out, lo, axis=axis)
        b = np.take(out, np.minimum(lo + 1, out.shape[axis] - 1), axis=axis)
        shape = [1] * out.ndim
        shape[axis] = len(coords)
        out = a + (b - a) * frac.reshape(shape)
    return out


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth field (z, y, x) with max |f| = 1: a sum of four random low-frequency separable cosines."""
    n_terms = 4
    freq = rng.uniform(0.0, 0.5 * np.pi, (n_terms, 3))
    phase = rng.uniform(0.0, 2 * np.pi, (n_terms, 3))
    weight = rng.normal(size=n_terms)
    z, y, x = (np.cos(freq[:, i, None] * np.linspace(-1.0, 1.0, n)[None] + phase[:, i, None]).astype(np.float32)
               for i, n in enumerate(shape))
    in_plane = (weight[:, None, None] * y[:, :, None] * x[:, None, :]).astype(np.float32)
    field = (z.T @ in_plane.reshape(n_terms, -1)).reshape(shape)  # sum over terms of z_k * (y_k x_k)
    return field / max(float(np.abs(field).max()), 1e-6)


def to_image(array: np.ndarray, anatomy: TissueMap) -> sitk.Image:
    """An (z, y, x) array as a SimpleITK image on the phantom's grid (LPS, identity direction)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(anatomy.spacing)
    image.SetOrigin(anatomy.origin)
    return image


def make_phantom(region: str = "thigh", shape: tuple[int, int, int] = (40, 432, 432),
                 spacing: tuple[float, float, float] | None = None, contrast: str = "t1", *,
                 noise: float = 0.03, bias: float = 0.2, legs: str = "both", touching: bool = False,
                 fat_infiltration: float = 0.0, slice_thickness_mm: float | None = None,
                 seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """A bilateral (or one-leg) thigh or calf ("leg") phantom and its exact muscle label map.

    ``shape`` is (z, y, x) voxels, ``spacing`` (x, y, z) mm or None to fit the field of view to the
    body (about 0.9 mm for 432 columns; 5 mm slices for the thigh, 6 mm for the calf). Returns
    ``(image, labels)``: float32 intensities and uint8 volume labels (right muscles 1..N, left
    N+1..2N of the region's :class:`~dafne_logic.core.labels.LabelTable`), both in LPS with identity
    direction, the right leg at small x indices and the body midline near x = 0. The same ``seed``
    gives identical arrays; the anatomy depends on ``seed``, ``region``, ``shape``, ``spacing``,
    ``legs`` and ``touching`` only, so contrasts of one seed share their labels.
    See :func:`render_contrast` for the other arguments.
    """
    anatomy = phantom_tissue_map(region, shape, spacing, seed, legs=legs, touching=touching)
    rng = _phantom_rng(seed)
    array = render_contrast(anatomy.tissues, anatomy.muscles, contrast, rng, spacing=anatomy.spacing,
                            noise=noise, bias=bias, fat_infiltration=fat_infiltration,
                            slice_thickness_mm=slice_thickness_mm)
    return to_image(array, anatomy), to_image(anatomy.muscles, anatomy)


def _phantom_rng(seed: int) -> np.random.Generator:
    """The intensity generator of :func:`make_phantom`: every contrast of a seed draws the same muscles' fat."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x1D7E]))


@dataclass
class DixonPhantom:
    """A phantom Dixon pair with its exact labels and true per-muscle fat fraction (:func:`make_dixon_phantom`)."""

    water: sitk.Image
    fat: sitk.Image
    labels: sitk.Image  # uint8 volume labels, as make_phantom's
    true_fat_fraction: dict[int, float]  # volume label -> percent, mean over its voxels


def make_dixon_phantom(region: str = "thigh", shape: tuple[int, int, int] = (40, 432, 432),
                       spacing: tuple[float, float, float] | None = None, *, noise: float = 0.03, bias: float = 0.2,
                       legs: str = "both", touching: bool = False, fat_infiltration: float = 0.0,
                       seed: int = 0) -> DixonPhantom:
    """``make_phantom(..., contrast="water")``, ``contrast="fat"`` and :func:`true_fat_fraction` with
    the same arguments (identical arrays), building the anatomy once instead of three times."""
    anatomy = phantom_tissue_map(region, shape, spacing, seed, legs=legs, touching=touching)

    def render(contrast: str) -> sitk.Image:
        return to_image(render_contrast(anatomy.tissues, anatomy.muscles, contrast, _phantom_rng(seed),
                                        spacing=anatomy.spacing, noise=noise, bias=bias,
                                        fat_infiltration=fat_infiltration), anatomy)

    _, truth = _true_fat_fraction(anatomy, seed, fat_infiltration)
    return DixonPhantom(render("water"), render("fat"), to_image(anatomy.muscles, anatomy), truth)


def true_fat_fraction(region: str = "thigh", shape: tuple[int, int, int] = (40, 432, 432),
                      spacing: tuple[float, float, float] | None = None, *, legs: str = "both",
                      touching: bool = False, fat_infiltration: float = 0.0,
                      seed: int = 0) -> tuple[sitk.Image, dict[int, float]]:
    """The fat fraction (percent) that the Dixon pair of :func:`make_phantom` was drawn with.

    ``make_phantom(..., contrast="water")`` and ``contrast="fat"`` with the same arguments form a
    consistent Dixon pair: both mix each muscle voxel with the same share of fat, in the same
    proton-density units (the water table has muscle 1 and fat 0.12, the fat table muscle 0.08
    and fat 1, so pure muscle holds 7.4 % fat and subcutaneous fat 89 %), under the same bias
    field. Returns the per-voxel truth 100·F/(W+F) of the noise-free, unblurred images (float32
    image on the phantom's grid, 0 in air) and, per volume label present, the mean over its voxels.
    """
    anatomy = phantom_tissue_map(region, shape, spacing, seed, legs=legs, touching=touching)
    percent, per_label = _true_fat_fraction(anatomy, seed, fat_infiltration)
    return to_image(percent, anatomy), per_label


def _true_fat_fraction(anatomy: TissueMap, seed: int, fat_infiltration: float) -> tuple[np.ndarray, dict[int, float]]:
    """(per-voxel truth (z, y, x) float32 percent, per-label mean) of :func:`true_fat_fraction`."""
    fat = _draw_muscle_fat(anatomy.tissues, anatomy.muscles, _phantom_rng(seed), anatomy.spacing, fat_infiltration)
    water_image = _clean_intensities(INTENSITIES["water"], anatomy.tissues, fat)
    fat_image = _clean_intensities(INTENSITIES["fat"], anatomy.tissues, fat)
    total = water_image + fat_image
    percent = np.divide(100.0 * fat_image, total, out=np.zeros_like(total), where=total > 0).astype(np.float32)
    labels = anatomy.muscles.astype(np.intp)
    counts = np.bincount(labels.ravel(), minlength=1)
    sums = np.bincount(labels.ravel(), weights=percent.ravel().astype(np.float64), minlength=1)
    per_label = {int(v): float(sums[v] / counts[v]) for v in np.flatnonzero(counts) if v > 0}
    return percent, per_label
