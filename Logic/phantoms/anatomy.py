"""Procedural lower-limb anatomy: tissue classes and muscle labels of bilateral thigh or calf volumes.

Each leg is described in a **leg-local frame**: ``u`` points laterally, ``v`` posteriorly (mm), so a
left leg is the mirror image of a right one by construction. Inside that frame the muscle
compartment (everything deep to the fascia) is an egg-shaped ellipse whose four semi-axes (lateral,
medial, anterior, posterior) scale along z, perturbed by a few angular harmonics. Around it lie the
subcutaneous fat (thickness varying with angle) and the skin. Positions of muscles, bones and
vessels are given in **normalised compartment coordinates** (the unperturbed compartment is the
unit disc), so the layout follows the compartment's size and shape.

Muscles tile the compartment as an additively weighted Voronoi partition of polyline seeds
(``cost_i = distance(p, seed_i) - weight_i + smooth noise_i``; each voxel takes the cheapest
muscle); voxels whose two cheapest costs nearly tie form the intermuscular fat septa. Seeds, weights
and noise vary smoothly along z, so muscles taper and drift between slices. Bones (femur, or tibia
and fibula) with cortex and marrow and fat-padded neurovascular bundles are carved out last.

Anatomy is defined along a segment of ``length_mm`` of the limb; ``t`` in 0..1 runs from its distal
to its proximal end (patient superior = +z in LPS). Everything here is geometry; intensities live
in :mod:`dafne_logic.phantoms.images`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.core.labels import BUILTIN_TABLES, LabelTable, Side

__all__ = ["Tissue", "TissueMap", "REGIONS", "phantom_tissue_map", "default_spacing"]


class Tissue(enum.IntEnum):
    """Tissue classes of the phantom (values of :attr:`TissueMap.tissues`)."""

    BACKGROUND = 0
    SKIN = 1
    SUBCUTANEOUS_FAT = 2
    FASCIA = 3
    INTERMUSCULAR_FAT = 4  # septa between muscles and fat pads around vessels
    CORTICAL_BONE = 5
    MARROW = 6
    MUSCLE = 7  # labelled muscles and unlabelled ones (e.g. the deep posterior calf compartment)
    NEUROVASCULAR = 8  # vessels and nerves


# (distal t=0, middle t=0.5, proximal t=1) keyframes of a value or an (u, v) point.
Keyframes = tuple[float, float, float]
PointKeyframes = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class MuscleSpec:
    """One Voronoi seed: a labelled muscle (``name`` in the region's table) or unlabelled muscle (None)."""

    name: str | None
    path: tuple[PointKeyframes, ...]  # polyline control points, normalised compartment coordinates
    weight: Keyframes  # additive weight, normalised units: larger means a larger muscle
    anchor: int | None = None  # index of the bone whose centre the path is relative to


@dataclass(frozen=True)
class BoneSpec:
    """A long bone: polar radius ``R * (1 + lobe_amp * ((1 + cos(lobes * (angle - lobe_angle))) / 2) ** lobe_power)``."""

    center: PointKeyframes  # normalised compartment coordinates
    radius_mm: Keyframes
    cortex_mm: Keyframes
    lobes: int = 0
    lobe_amp: float = 0.0
    lobe_angle_deg: float = 0.0  # leg-local angle: 0 lateral, 90 posterior, -90 anterior
    lobe_power: float = 1.0


@dataclass(frozen=True)
class VesselSpec:
    """A vessel (or nerve) in a fat pad: deep at ``center`` or, with ``fat_angle_deg``, in the subcutaneous fat."""

    radius_mm: float
    pad_mm: float
    center: PointKeyframes | None = None
    fat_angle_deg: float | None = None


@dataclass(frozen=True)
class RegionSpec:
    """Average anatomy of one region, before the per-subject random variation."""

    table: LabelTable
    length_mm: float  # extent of the anatomy along z
    slice_mm: float  # default slice spacing, as in the usual muscle protocols
    axes_mm: tuple[float, float, float, float]  # compartment semi-axes: lateral, medial, anterior, posterior
    scale: Keyframes  # compartment scale along z
    fat_mm: tuple[float, float]  # range of the subject's mean subcutaneous fat thickness
    fat_profile: Keyframes  # fat thickness factor along z
    muscles: tuple[MuscleSpec, ...]
    bones: tuple[BoneSpec, ...]
    vessels: tuple[VesselSpec, ...]


def _p(*keys: tuple[float, float]) -> PointKeyframes:
    """A point's keyframes; one (u, v) means a fixed point."""
    return (keys[0], keys[0], keys[0]) if len(keys) == 1 else (keys[0], keys[1], keys[2])


# Right thigh seen from below, u lateral, v posterior (normalised). Distal muscles grow
# (vastus medialis, semimembranosus, biceps short head), proximal ones shrink (adductors).
THIGH_SPEC = RegionSpec(
    table=BUILTIN_TABLES["thigh"],
    length_mm=320.0,
    slice_mm=5.0,
    axes_mm=(66.0, 60.0, 62.0, 64.0),
    scale=(0.78, 0.95, 1.08),
    fat_mm=(6.0, 20.0),
    fat_profile=(0.8, 1.0, 1.25),
    muscles=(
        MuscleSpec("vastus lateralis", (_p((0.3, -0.72), (0.35, -0.72), (0.42, -0.68)),
                                        _p((0.78, -0.3), (0.8, -0.25), (0.82, -0.2)),
                                        _p((0.78, 0.15), (0.8, 0.22), (0.8, 0.25))), (0.03, 0.09, 0.09)),
        MuscleSpec("vastus medialis", (_p((-0.3, -0.75), (-0.35, -0.68), (-0.3, -0.66)),
                                       _p((-0.72, -0.25), (-0.6, -0.38), (-0.45, -0.48))), (0.2, 0.07, -0.05)),
        MuscleSpec("vastus intermedius", (_p((0.26, -0.05), (0.26, -0.05), (0.26, -0.06)),
                                          _p((0.22, -0.2), (0.22, -0.2), (0.22, -0.2)),
                                          _p((0.02, -0.32), (0.02, -0.32), (0.02, -0.3)),
                                          _p((-0.2, -0.22), (-0.2, -0.22), (-0.18, -0.2))), (0.08, 0.09, 0.09),
                   anchor=0),
        MuscleSpec("rectus femoris", (_p((-0.05, -0.88), (0.0, -0.84), (0.1, -0.8)),
                                      _p((0.08, -0.9), (0.15, -0.84), (0.28, -0.78))), (-0.01, 0.04, 0.08)),
        MuscleSpec("sartorius", (_p((-0.85, 0.05), (-0.7, -0.42), (-0.38, -0.8)),
                                 _p((-0.82, 0.2), (-0.8, -0.25), (-0.55, -0.7))), (-0.01, -0.02, -0.03)),
        MuscleSpec("gracilis", (_p((-0.76, 0.45), (-0.82, 0.25), (-0.84, 0.1)),), (0.0, -0.02, -0.06)),
        MuscleSpec("adductor magnus", (_p((-0.5, 0.3), (-0.48, 0.25), (-0.45, 0.2)),
                                       _p((-0.2, 0.32), (-0.15, 0.3), (-0.1, 0.28))), (-0.01, 0.05, 0.14)),
        MuscleSpec("adductor longus", (_p((-0.5, 0.02), (-0.45, -0.02), (-0.42, -0.1)),), (-0.1, -0.01, 0.1)),
        MuscleSpec("semimembranosus", (_p((-0.5, 0.65), (-0.45, 0.66), (-0.38, 0.7)),), (0.12, 0.06, -0.06)),
        MuscleSpec("semitendinosus", (_p((-0.2, 0.9), (-0.15, 0.88), (-0.12, 0.86)),), (0.0, 0.07, 0.09)),
        MuscleSpec("biceps femoris long head", (_p((0.25, 0.88), (0.18, 0.88), (0.15, 0.88)),
                                                _p((0.45, 0.7), (0.38, 0.74), (0.33, 0.76))), (-0.02, -0.01, -0.02)),
        MuscleSpec("biceps femoris short head", (_p((0.45, 0.38), (0.42, 0.36), (0.38, 0.32)),), (0.03, -0.07, -0.14)),
        MuscleSpec(None, (_p((-0.25, 0.05), (-0.3, 0.02), (-0.35, 0.0)),), (-0.3, -0.12, 0.04)),  # adductor brevis
    ),
    bones=(BoneSpec(center=_p((0.05, -0.05), (0.1, -0.06), (0.18, -0.06)), radius_mm=(15.0, 13.5, 14.0),
                    cortex_mm=(3.5, 5.5, 5.0), lobes=1, lobe_amp=0.18, lobe_angle_deg=90.0, lobe_power=8.0),),
    vessels=(
        VesselSpec(3.5, 2.5, center=_p((-0.66, -0.05), (-0.6, -0.24), (-0.5, -0.38))),  # superficial femoral
        VesselSpec(2.0, 1.5, center=_p((-0.1, 0.1), (-0.12, 0.1), (-0.1, 0.1))),  # deep femoral
        VesselSpec(2.5, 2.0, center=_p((0.1, 0.68), (0.05, 0.62), (0.05, 0.58))),  # sciatic nerve
        VesselSpec(2.5, 0.0, fat_angle_deg=200.0),  # great saphenous vein
    ),
)

# Right calf, same frame. The deep posterior compartment (tibialis posterior, flexors) is muscle
# without a label; the gastrocnemii shrink distally where the soleus grows.
LEG_SPEC = RegionSpec(
    table=BUILTIN_TABLES["leg"],
    length_mm=260.0,
    slice_mm=6.0,
    axes_mm=(42.0, 46.0, 40.0, 52.0),
    scale=(0.8, 0.98, 1.05),
    fat_mm=(3.5, 12.0),
    fat_profile=(0.9, 1.0, 1.1),
    muscles=(
        MuscleSpec("soleus", (_p((-0.5, 0.22), (-0.45, 0.3), (-0.4, 0.34)),
                              _p((0.0, 0.36), (0.0, 0.4), (0.0, 0.42)),
                              _p((0.4, 0.28), (0.4, 0.3), (0.42, 0.32))), (0.14, 0.06, 0.0)),
        MuscleSpec("gastrocnemius medialis", (_p((-0.35, 0.92), (-0.4, 0.84), (-0.42, 0.8)),
                                              _p((-0.7, 0.62), (-0.75, 0.5), (-0.78, 0.42))), (-0.07, 0.1, 0.15)),
        MuscleSpec("gastrocnemius lateralis", (_p((0.3, 0.9), (0.35, 0.82), (0.38, 0.78)),), (-0.12, 0.0, 0.08)),
        MuscleSpec("tibialis anterior", (_p((0.0, -0.7), (0.02, -0.68), (0.05, -0.66)),), (0.02, 0.05, 0.05)),
        MuscleSpec("extensor digitorum longus", (_p((0.48, -0.55), (0.45, -0.52), (0.42, -0.5)),), (-0.04, -0.02, -0.02)),
        MuscleSpec("peroneus", (_p((0.82, -0.15), (0.85, -0.05), (0.86, 0.0)),
                                _p((0.78, 0.2), (0.8, 0.2), (0.8, 0.22))), (0.0, 0.0, -0.01)),
        MuscleSpec(None, (_p((-0.2, -0.05), (-0.18, -0.08), (-0.15, -0.1)),
                          _p((0.28, 0.05), (0.28, 0.03), (0.3, 0.0))), (-0.05, -0.07, -0.09)),  # deep posterior
    ),
    bones=(
        BoneSpec(center=_p((-0.45, -0.5), (-0.45, -0.52), (-0.42, -0.5)), radius_mm=(9.0, 9.0, 11.5),
                 cortex_mm=(3.0, 3.2, 2.5), lobes=3, lobe_amp=0.3, lobe_angle_deg=-100.0, lobe_power=1.5),
        BoneSpec(center=_p((0.6, -0.05), (0.6, 0.0), (0.6, 0.05)), radius_mm=(5.0, 5.5, 6.0),
                 cortex_mm=(2.0, 2.0, 1.8), lobes=3, lobe_amp=0.15, lobe_angle_deg=0.0),
    ),
    vessels=(
        VesselSpec(1.8, 1.5, center=_p((0.15, -0.3), (0.15, -0.3), (0.18, -0.3))),  # anterior tibial
        VesselSpec(2.0, 2.0, center=_p((-0.3, 0.18), (-0.28, 0.2), (-0.25, 0.2))),  # posterior tibial
        VesselSpec(1.8, 1.5, center=_p((0.4, 0.18), (0.4, 0.15), (0.42, 0.14))),  # peroneal
        VesselSpec(2.0, 0.0, fat_angle_deg=205.0),  # great saphenous vein
        VesselSpec(1.8, 0.0, fat_angle_deg=95.0),  # small saphenous vein
    ),
)

REGIONS: dict[str, RegionSpec] = {"thigh": THIGH_SPEC, "leg": LEG_SPEC}

SKIN_MM = 1.6
FASCIA_MM = 0.9
N_HARMONICS = 4  # angular harmonics of the compartment outline and the fat thickness
NOISE_FIELDS = 4  # smooth random fields mixed per muscle to make boundaries wavy
NOISE_GRID = 0.15  # normalised units between nodes of the noise fields (in u, v)
NOISE_GRID_Z_MM = 30.0
SEED_CORE = 0.1  # normalised cost margin by which each seed beats the others on itself
_HARMONIC_DECAY = 1.0 / np.arange(1, N_HARMONICS + 1)[:, None]  # higher harmonics weaker: smooth outlines
_ANGLE_BINS = 4096  # resolution of the tabulated outline: 0.1 mm at 100 mm from the leg centre


def _interp(keys: np.ndarray, t: float) -> np.ndarray:
    """Quadratic interpolation through keyframes at t = 0, 0.5, 1 (``keys``: (3, ...))."""
    weights = np.array([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)])
    return np.tensordot(weights, keys, axes=1)


@dataclass(frozen=True)
class LegAnatomy:
    """One leg of one subject, all random choices made (``keys`` arrays have keyframes first)."""

    spec: RegionSpec
    side: Side
    axes_mm: np.ndarray  # (4,) lateral, medial, anterior, posterior
    scale: np.ndarray  # (3,)
    outline_harmonics: np.ndarray  # (3, N_HARMONICS, 2): cos/sin coefficients per keyframe
    fat_mm: float
    fat_profile: np.ndarray  # (3,)
    fat_harmonics: np.ndarray  # (3, N_HARMONICS, 2)
    rotation_rad: float  # of the leg-local frame, positive = external rotation
    muscle_paths: tuple[np.ndarray, ...]  # per seed: (3, K, 2)
    muscle_weights: np.ndarray  # (3, M)
    muscle_values: np.ndarray  # (M,) volume label of each seed (0 for unlabelled muscle)
    noise_mix: np.ndarray  # (NOISE_FIELDS, M) normalised units
    noise_fields: np.ndarray  # (NOISE_FIELDS, nu, nv, nz) unit-variance smooth fields
    septum_mm: float
    bone_centers: np.ndarray  # (3, B, 2)
    bone_radius_mm: np.ndarray  # (3, B)
    bone_cortex_mm: np.ndarray  # (3, B)
    vessel_centers: np.ndarray  # (3, V, 2), NaN for subcutaneous vessels
    center_y_mm: float


@dataclass(frozen=True)
class Subject:
    """Both legs of one random subject plus where the imaged slab lies along the limb."""

    region: RegionSpec
    legs: dict[Side, LegAnatomy]
    t_center: float  # anatomical position (0..1) of the middle slice
    gap_mm: np.ndarray  # (3,) keyframes of the gap between the legs when they do not touch
    touching: bool  # legs pressed together: the gap is negative, decided per slice


def _draw_leg(spec: RegionSpec, rng: np.random.Generator) -> LegAnatomy:
    """A random right leg: the average anatomy of ``spec`` with per-subject variation."""
    n_m = len(spec.muscles)
    noise_fields = _smooth_fields(np.random.default_rng(rng.integers(2 ** 63)), spec.length_mm)
    size = rng.uniform(0.88, 1.12)
    # Positions vary per subject (common to all keyframes) and a little along z (per keyframe).
    paths = tuple(np.asarray(m.path, float).transpose(1, 0, 2)
                  + rng.normal(0, 0.04, (1, len(m.path), 2)) + rng.normal(0, 0.015, (3, len(m.path), 2))
                  for m in spec.muscles)
    bones = (np.array([b.center for b in spec.bones], float).transpose(1, 0, 2)
             + rng.normal(0, 0.03, (1, len(spec.bones), 2)))
    vessels = np.array([v.center if v.center is not None else ((np.nan, np.nan),) * 3 for v in spec.vessels],
                       float).transpose(1, 0, 2)
    return LegAnatomy(
        spec=spec, side="right", axes_mm=np.asarray(spec.axes_mm) * size * rng.uniform(0.94, 1.06, 4),
        scale=np.asarray(spec.scale) * rng.uniform(0.97, 1.03, 3),
        outline_harmonics=_HARMONIC_DECAY * (rng.normal(0, 0.02, (1, N_HARMONICS, 2))
                                             + rng.normal(0, 0.008, (3, N_HARMONICS, 2))),
        fat_mm=rng.uniform(*spec.fat_mm), fat_profile=np.asarray(spec.fat_profile) * rng.uniform(0.9, 1.1, 3),
        fat_harmonics=_HARMONIC_DECAY * (rng.normal(0, 0.15, (1, N_HARMONICS, 2))
                                         + rng.normal(0, 0.05, (3, N_HARMONICS, 2))),
        rotation_rad=np.deg2rad(rng.normal(0, 6)),
        muscle_paths=paths,
        muscle_weights=np.array([m.weight for m in spec.muscles], float).T + rng.normal(0, 0.035, (1, n_m)),
        muscle_values=np.array([0 if m.name is None else spec.table.value_of(spec.table.muscle_index(m.name), "right")
                                for m in spec.muscles]),
        noise_mix=rng.normal(0, 0.02, (NOISE_FIELDS, n_m)), noise_fields=noise_fields,
        septum_mm=rng.uniform(0.5, 1.4),
        bone_centers=bones,
        bone_radius_mm=np.array([b.radius_mm for b in spec.bones], float).T * rng.uniform(0.9, 1.1),
        bone_cortex_mm=np.array([b.cortex_mm for b in spec.bones], float).T * rng.uniform(0.85, 1.15),
        vessel_centers=vessels, center_y_mm=rng.normal(0, 8),
    )


def _other_leg(right: LegAnatomy, rng: np.random.Generator) -> LegAnatomy:
    """The subject's left leg: the right one (mirrored by the leg-local frame) with small differences."""
    n_muscles = right.spec.table.n_muscles
    return replace(
        right, side="left",
        noise_fields=_smooth_fields(np.random.default_rng(rng.integers(2 ** 63)), right.spec.length_mm),
        axes_mm=right.axes_mm * rng.uniform(0.97, 1.03, 4),
        outline_harmonics=right.outline_harmonics + rng.normal(0, 0.008, right.outline_harmonics.shape),
        fat_mm=right.fat_mm * rng.uniform(0.92, 1.08),
        fat_harmonics=right.fat_harmonics + rng.normal(0, 0.05, right.fat_harmonics.shape),
        rotation_rad=right.rotation_rad + np.deg2rad(rng.normal(0, 3)),
        muscle_paths=tuple(p + rng.normal(0, 0.015, (1,) + p.shape[1:]) for p in right.muscle_paths),
        muscle_weights=right.muscle_weights + rng.normal(0, 0.01, (1, len(right.muscle_values))),
        muscle_values=np.where(right.muscle_values > 0, right.muscle_values + n_muscles, 0),
        bone_centers=right.bone_centers + rng.normal(0, 0.01, (1,) + right.bone_centers.shape[1:]),
        center_y_mm=right.center_y_mm + rng.normal(0, 3),
    )


def _smooth_fields(rng: np.random.Generator, length_mm: float) -> np.ndarray:
    """Unit-variance random fields on a coarse (u, v, z) grid covering [-1.5, 1.5]² × the limb's length."""
    n_uv = int(round(3.0 / NOISE_GRID)) + 1
    n_z = int(np.ceil(length_mm / NOISE_GRID_Z_MM)) + 1
    fields = ndimage.gaussian_filter(rng.standard_normal((NOISE_FIELDS, n_uv, n_uv, n_z)), (0, 1.5, 1.5, 1.0))
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def _draw_subject(region: str, rng: np.random.Generator, touching: bool) -> Subject:
    """All random anatomical choices of one subject (both legs, even if only one is imaged)."""
    spec = _region(region)
    right = _draw_leg(spec, rng)
    left = _other_leg(right, rng)
    gap = rng.uniform(12, 40)  # widening towards the knee or ankle
    gap_mm = np.array([gap + rng.uniform(0, 25), gap + rng.uniform(0, 8), gap])
    return Subject(spec, {"right": right, "left": left}, t_center=rng.uniform(0.42, 0.58), gap_mm=gap_mm,
                   touching=touching)


def _region(region: str) -> RegionSpec:
    if region not in REGIONS:
        raise InputError(f"unknown phantom region {region!r}; choose one of {', '.join(REGIONS)}")
    return REGIONS[region]


@dataclass(frozen=True)
class _LegSection:
    """A leg's geometry evaluated at one anatomical position t."""

    leg: LegAnatomy
    t: float
    axes: np.ndarray  # (4,) mm, scaled
    harmonics: np.ndarray  # (N_HARMONICS, 2)
    fat_mm: float
    fat_harmonics: np.ndarray

    @classmethod
    def at(cls, leg: LegAnatomy, t: float) -> _LegSection:
        return cls(leg, t, leg.axes_mm * float(_interp(leg.scale, t)), _interp(leg.outline_harmonics, t),
                   leg.fat_mm * float(_interp(leg.fat_profile, t)), _interp(leg.fat_harmonics, t))

    def compartment_radius(self, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Normalised compartment radius in the normalised direction (cos, sin) = (c, s); 1 = unperturbed."""
        return 1.0 + _harmonics(self.harmonics, c, s)

    def fat_thickness(self, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Subcutaneous fat thickness (mm) in the normalised direction (c, s), at least 1.5 mm."""
        return np.maximum(self.fat_mm * (1.0 + _harmonics(self.fat_harmonics, c, s)), 1.5)

    def outline_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised compartment radius, unit length (mm) and fat thickness (mm) per angle bin (float32)."""
        theta = np.arange(_ANGLE_BINS) * (2 * np.pi / _ANGLE_BINS) - np.pi
        c, s = np.cos(theta), np.sin(theta)
        return tuple(a.astype(np.float32) for a in  # type: ignore[return-value]
                     (self.compartment_radius(c, s), self.unit_length_mm(c, s), self.fat_thickness(c, s)))

    def unit_length_mm(self, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Length in mm of a unit normalised radius in the normalised direction (c, s)."""
        a = np.where(c > 0, self.axes[0], self.axes[1])
        b = np.where(s > 0, self.axes[3], self.axes[2])
        return np.hypot(a * c, b * s)

    def to_mm(self, un: float, vn: float) -> tuple[float, float]:
        """Leg-local mm of a normalised point."""
        return (float(un * (self.axes[0] if un > 0 else self.axes[1])),
                float(vn * (self.axes[3] if vn > 0 else self.axes[2])))

    def skin_outline_mm(self, n: int = 180) -> tuple[np.ndarray, np.ndarray]:
        """Leg-local (u, v) mm of ``n`` points on the skin surface (before the leg's rotation)."""
        theta = np.linspace(-np.pi, np.pi, n, endpoint=False)
        c, s = np.cos(theta), np.sin(theta)
        length = self.unit_length_mm(c, s)
        radius = self.compartment_radius(c, s) * length + self.fat_thickness(c, s) + SKIN_MM
        return (radius * np.where(c > 0, self.axes[0], self.axes[1]) * c / length,
                radius * np.where(s > 0, self.axes[3], self.axes[2]) * s / length)

    def medial_extent_mm(self) -> float:
        """How far the skin reaches from the leg centre towards the body midline (along x)."""
        u, v = self.skin_outline_mm()
        cr, sr = np.cos(self.leg.rotation_rad), np.sin(self.leg.rotation_rad)
        return float(np.max(-(cr * u + sr * v)))  # see _rasterise_leg for the frame

    def extent_mm(self) -> float:
        """The largest distance from the leg centre to its skin surface."""
        return float(np.max(np.hypot(*self.skin_outline_mm())))


def _harmonics(coeffs: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Sum over k of ``coeffs[k-1] . (cos k theta, sin k theta)`` given cos and sin of theta.

    Chebyshev recurrences instead of trigonometric functions: this runs on every pixel of every slice.
    """
    total = np.zeros(np.broadcast(c, s).shape)
    cos_k, sin_k, cos_prev, sin_prev = c, s, 1.0, 0.0
    for a, b in coeffs:
        total = total + a * cos_k + b * sin_k
        cos_k, cos_prev = 2 * c * cos_k - cos_prev, cos_k
        sin_k, sin_prev = 2 * c * sin_k - sin_prev, sin_k
    return total


def _slab_positions(n_slices: int, spacing_z: float) -> np.ndarray:
    """Physical z (mm) of each slice centre; the slab is centred on z = 0."""
    return (np.arange(n_slices) - (n_slices - 1) / 2.0) * spacing_z


def _t_of(subject: Subject, z_mm: float) -> float:
    return float(np.clip(subject.t_center + z_mm / subject.region.length_mm, 0.0, 1.0))


def _leg_centres(subject: Subject, slices: dict[Side, _LegSection]) -> dict[Side, tuple[float, float]]:
    """Physical (x, y) of each leg centre: the legs sit either side of x = 0, ``gap`` apart."""
    right, left = slices["right"], slices["left"]
    if subject.touching:
        # Touching: overlap by part of the thinner medial fat, so skin meets skin and fat meets fat.
        gap = -(0.5 * float(min(right.fat_thickness(np.array(-1.0), np.array(0.0)), left.fat_thickness(np.array(-1.0), np.array(0.0)))) + 1.0)
    else:
        gap = float(_interp(subject.gap_mm, right.t))
    drift = 6.0 * (right.t - subject.t_center)  # legs converge slightly towards the hips
    return {"right": (-(right.medial_extent_mm() + gap / 2) + drift, right.leg.center_y_mm),
            "left": (left.medial_extent_mm() + gap / 2 - drift, left.leg.center_y_mm)}


def default_spacing(region: str, shape: tuple[int, int, int], seed: int = 0) -> tuple[float, float, float]:
    """Spacing (x, y, z) mm whose field of view fits both legs of the subject ``seed`` with a margin.

    Thick axial slices as in the usual muscle protocols (5 mm thigh, 6 mm calf).
    """
    spacing_z = _region(region).slice_mm
    n_z, n_y, n_x = shape
    subject = _draw_subject(region, np.random.default_rng(_seed_sequence(seed)), touching=False)
    width = height = 0.0
    for z in _slab_positions(n_z, spacing_z)[:: max(1, n_z // 8)]:
        slices = {s: _LegSection.at(leg, _t_of(subject, z)) for s, leg in subject.legs.items()}
        centres = _leg_centres(subject, slices)
        for side, sl in slices.items():
            cx, cy = centres[side]
            width = max(width, 2 * (abs(cx) + sl.extent_mm()))
            height = max(height, 2 * (abs(cy) + sl.extent_mm()))
    pixel = round(max(width / n_x, height / n_y) * 1.12, 3)
    return (pixel, pixel, spacing_z)


def _seed_sequence(seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), 0x7A1B])  # stream of the anatomy, apart from rendering


def _polyline_distance(pu: np.ndarray, pv: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Euclidean distance from the points (``pu``, ``pv``) (N,) each to the polyline ``poly`` (K, 2)."""
    best = np.hypot(pu - poly[0, 0], pv - poly[0, 1])
    for (au, av), (bu, bv) in zip(poly[:-1].tolist(), poly[1:].tolist()):
        du, dv = bu - au, bv - av
        s = np.clip(((pu - au) * du + (pv - av) * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
        np.minimum(best, np.hypot(pu - au - s * du, pv - av - s * dv), out=best)
    return best


@dataclass(frozen=True)
class _LegRaster:
    """One leg drawn on a crop of one slice."""

    rows: slice
    cols: slice
    tissues: np.ndarray  # (h, w) uint8
    labels: np.ndarray  # (h, w) uint8
    depth_mm: np.ndarray  # (h, w) signed depth below the skin surface (positive inside)


def _rasterise_leg(sl: _LegSection, centre: tuple[float, float], x_mm: np.ndarray,
                   y_mm: np.ndarray) -> _LegRaster | None:
    """Tissues and labels of one leg on the slice with pixel coordinates ``x_mm`` (X,), ``y_mm`` (Y,)."""
    leg = sl.leg
    reach = sl.extent_mm() + 2.0
    cols = np.flatnonzero(np.abs(x_mm - centre[0]) <= reach)
    rows = np.flatnonzero(np.abs(y_mm - centre[1]) <= reach)
    if cols.size == 0 or rows.size == 0:
        return None
    rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    xs, ys = x_mm[cs], y_mm[rs]
    # leg-local mm: u lateral (patient right = -x for the right leg), v posterior (+y), rotated
    flip = -1.0 if leg.side == "right" else 1.0
    cr, sr = np.cos(leg.rotation_rad), np.sin(leg.rotation_rad)
    dx = ((xs - centre[0]) * flip).astype(np.float32)[None, :]
    dy = (ys - centre[1]).astype(np.float32)[:, None]
    u = cr * dx - sr * dy
    v = sr * dx + cr * dy
    un = u / np.where(u > 0, sl.axes[0], sl.axes[1]).astype(np.float32)
    vn = v / np.where(v > 0, sl.axes[3], sl.axes[2]).astype(np.float32)
    rho = np.hypot(un, vn)
    # Outline functions of the angle, tabulated: cheaper than evaluating harmonics per pixel.
    bins = np.rint((np.arctan2(vn, un) + np.pi) * (_ANGLE_BINS / (2 * np.pi))).astype(np.int32) % _ANGLE_BINS
    radius_n, length_mm, fat_mm = sl.outline_tables()
    below_fascia = (radius_n[bins] - rho) * length_mm[bins]  # mm below the fascia, positive inside
    depth = below_fascia + fat_mm[bins] + SKIN_MM  # mm below the skin surface
    tissues = np.zeros(u.shape, np.uint8)
    tissues[depth > 0] = Tissue.SKIN
    tissues[depth > SKIN_MM] = Tissue.SUBCUTANEOUS_FAT
    tissues[below_fascia > 0] = Tissue.FASCIA
    inside = below_fascia > FASCIA_MM
    labels = np.zeros(u.shape, np.uint8)

    # Muscles: additively weighted Voronoi of the seeds, with smooth per-muscle noise.
    idx = np.flatnonzero(inside)
    pu, pv = un.ravel()[idx], vn.ravel()[idx]
    bone_centres = _interp(leg.bone_centers, sl.t)
    paths = [(_interp(path, sl.t) + (0.0 if m.anchor is None else bone_centres[m.anchor])).astype(np.float32)
             for path, m in zip(leg.muscle_paths, leg.spec.muscles)]
    z_index = sl.t * leg.spec.length_mm / NOISE_GRID_Z_MM

    def noise(pu: np.ndarray, pv: np.ndarray) -> np.ndarray:
        return leg.noise_mix.T @ _sample_fields(leg.noise_fields, pu, pv, z_index)

    weights = _keep_every_seed(paths, _interp(leg.muscle_weights, sl.t), leg.muscle_values > 0, noise)
    cost = np.stack([_polyline_distance(pu, pv, path) - np.float32(w) for path, w in zip(paths, weights)])
    fields = _sample_fields(leg.noise_fields, pu, pv, z_index)
    cost += (leg.noise_mix.T @ fields).astype(np.float32)
    order = np.argpartition(cost, 1, axis=0)[:2]
    c1 = np.take_along_axis(cost, order[:1], 0)[0]
    c2 = np.take_along_axis(cost, order[1:2], 0)[0]
    # Septa: where the two cheapest muscles nearly tie; their width waxes and wanes along them.
    septum = (c2 - c1) * float(np.mean(sl.axes)) < leg.septum_mm * (1.0 + np.tanh(fields[0]))
    tissues.ravel()[idx] = np.where(septum, Tissue.INTERMUSCULAR_FAT, Tissue.MUSCLE)
    labels.ravel()[idx] = np.where(septum, 0, leg.muscle_values[order[0]])

    def window(cu: float, cv: float, r: float) -> tuple[slice, slice]:
        """Crop rows and columns within ``r`` mm of the leg-local point (cu, cv)."""
        px = centre[0] + flip * (cr * cu + sr * cv)
        py = centre[1] - sr * cu + cr * cv
        return (slice(np.searchsorted(ys, py - r), np.searchsorted(ys, py + r, "right")),
                slice(np.searchsorted(xs, px - r), np.searchsorted(xs, px + r, "right")))

    # Vessels in fat pads, deep or subcutaneous.
    for vspec, c in zip(leg.spec.vessels, _interp(leg.vessel_centers, sl.t)):
        if vspec.fat_angle_deg is not None:
            th = np.deg2rad(vspec.fat_angle_deg)
            ct, st = np.cos(th), np.sin(th)
            rn = sl.compartment_radius(ct, st) + 0.5 * sl.fat_thickness(ct, st) / sl.unit_length_mm(ct, st)
            cu, cv = sl.to_mm(rn * ct, rn * st)
        else:
            cu, cv = sl.to_mm(*c)
        w = window(cu, cv, vspec.radius_mm + vspec.pad_mm)
        d = np.hypot(u[w] - cu, v[w] - cv)
        pad = (d < vspec.radius_mm + vspec.pad_mm) & inside[w]
        tissues[w][pad] = Tissue.INTERMUSCULAR_FAT
        labels[w][pad] = 0
        vessel = (d < vspec.radius_mm) & (depth[w] > SKIN_MM)
        tissues[w][vessel] = Tissue.NEUROVASCULAR
        labels[w][vessel] = 0

    # Bones last: they displace everything but the skin.
    for c, radius, cortex, bspec in zip(bone_centres, _interp(leg.bone_radius_mm, sl.t),
                                        _interp(leg.bone_cortex_mm, sl.t), leg.spec.bones):
        cu, cv = sl.to_mm(*c)
        w = window(cu, cv, radius * (1 + bspec.lobe_amp))
        bu, bv = u[w] - cu, v[w] - cv
        lobe = ((1 + np.cos(bspec.lobes * (np.arctan2(bv, bu) - np.deg2rad(bspec.lobe_angle_deg)))) / 2) ** bspec.lobe_power
        outer = radius * (1 + bspec.lobe_amp * lobe)
        d = np.hypot(bu, bv)
        bone = (d < outer) & (depth[w] > SKIN_MM)
        tissues[w][bone] = Tissue.CORTICAL_BONE
        labels[w][bone] = 0
        tissues[w][bone & (d < outer - cortex * (1 + 0.5 * bspec.lobe_amp * lobe))] = Tissue.MARROW
    _drop_fragments(tissues, labels)
    return _LegRaster(rs, cs, tissues, labels, depth)


def _keep_every_seed(paths: list[np.ndarray], weights: np.ndarray, protected: np.ndarray,
                     noise: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Raise weights so that every ``protected`` seed beats all others by ``SEED_CORE`` somewhere on itself.

    Random jitter and noise could otherwise let a large neighbour swallow a small labelled muscle.
    ``noise(pu, pv)`` gives the (M, N) cost noise at normalised points.
    """
    weights = np.array(weights, float)
    costs = [np.stack([_polyline_distance(own[:, 0], own[:, 1], path) for path in paths]) + noise(own[:, 0], own[:, 1])
             for own in paths]  # per seed: (M, K_i) cost at its own points, before weights
    for _ in range(3):  # raising one weight shifts the others' margins a little
        for i in np.flatnonzero(protected):
            others = np.delete(costs[i] - weights[:, None], i, axis=0).min(axis=0)
            weights[i] = max(weights[i], float(np.min(costs[i][i] - others)) + SEED_CORE)
    return weights


def _drop_fragments(tissues: np.ndarray, labels: np.ndarray) -> None:
    """Keep each muscle's largest piece in the slice; stray pieces (cut off by vessels, bones or
    the noise) become intermuscular fat. In place, on (h, w) arrays."""
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, n = ndimage.label(labels[box] == value)
        if n > 1:
            stray = (pieces > 0) & (pieces != np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
            labels[box][stray] = 0
            tissues[box][stray] = Tissue.INTERMUSCULAR_FAT


def _sample_fields(fields: np.ndarray, pu: np.ndarray, pv: np.ndarray, z_index: float) -> np.ndarray:
    """Values (NOISE_FIELDS, N) of the coarse noise fields at the normalised points (``pu``, ``pv``)."""
    k = int(np.clip(np.floor(z_index), 0, fields.shape[-1] - 2))
    frac = float(np.clip(z_index - k, 0.0, 1.0))
    plane = (1 - frac) * fields[..., k] + frac * fields[..., k + 1]  # the slice through the coarse grid
    coords = [(pu + 1.5) / NOISE_GRID, (pv + 1.5) / NOISE_GRID]
    return np.stack([ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in plane])


@dataclass(frozen=True)
class TissueMap:
    """Exact anatomy of a phantom on its voxel grid.

    ``tissues`` (z, y, x) uint8 holds :class:`Tissue` values; ``muscles`` (z, y, x) uint8 holds
    volume labels of the region's table (patient-right muscles 1..N, patient-left N+1..2N, 0
    elsewhere, including unlabelled muscle). Geometry is LPS with identity direction: ``spacing`` is
    (x, y, z) mm and ``origin`` the physical (x, y, z) of voxel (0, 0, 0); x grows towards the
    patient's left, so the right leg lies at small x indices, and the body midline is near x = 0.
    """

    region: str
    table: LabelTable
    tissues: np.ndarray
    muscles: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


def phantom_tissue_map(region: str = "thigh", shape: tuple[int, int, int] = (40, 432, 432),
                       spacing: tuple[float, float, float] | None = None, seed: int = 0, *,
                       legs: str = "both", touching: bool = False) -> TissueMap:
    """Draw a random subject (``seed``) and rasterise its tissues and muscle labels.

    ``shape`` is (z, y, x) voxels; ``spacing`` (x, y, z) mm, or None to fit the field of view to the
    body (:func:`default_spacing`). ``legs`` is "both", "right" or "left" (the other leg is simply
    not drawn; the imaged one stays where it lies in the body). ``touching`` makes the thighs (or
    calves) press against each other, sharing a boundary of skin. Same arguments, same arrays.
    """
    spec = _region(region)
    if legs not in ("both", "right", "left"):
        raise InputError(f"legs must be 'both', 'right' or 'left', not {legs!r}")
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape must be three positive sizes (z, y, x), not {tuple(shape)}")
    n_z, n_y, n_x = (int(n) for n in shape)
    if spacing is None:
        spacing = default_spacing(region, (n_z, n_y, n_x), seed)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"phantom spacing must be three positive sizes (x, y, z) in mm, not {tuple(spacing)}")
    sx, sy, sz = (float(s) for s in spacing)
    z_positions = _slab_positions(n_z, sz)
    subject = _draw_subject(region, np.random.default_rng(_seed_sequence(seed)), touching)
    origin = (-(n_x - 1) / 2.0 * sx, -(n_y - 1) / 2.0 * sy, float(z_positions[0]))
    x_mm = origin[0] + np.arange(n_x) * sx
    y_mm = origin[1] + np.arange(n_y) * sy
    sides: tuple[Side, ...] = ("right", "left") if legs == "both" else (legs,)

    tissues = np.zeros((n_z, n_y, n_x), np.uint8)
    muscles = np.zeros((n_z, n_y, n_x), np.uint8)
    for k, z in enumerate(z_positions):
        slices = {s: _LegSection.at(leg, _t_of(subject, z)) for s, leg in subject.legs.items()}
        centres = _leg_centres(subject, slices)
        owner = np.zeros((n_y, n_x), np.int8)  # 1 + index of the leg drawn at each pixel
        best_depth = np.zeros((n_y, n_x))
        for i, side in enumerate(sides):
            raster = _rasterise_leg(slices[side], centres[side], x_mm, y_mm)
            if raster is None:
                continue
            # Where touching legs overlap, each pixel goes to the leg it lies deeper in.
            mine = raster.depth_mm > best_depth[raster.rows, raster.cols]
            tissues[k, raster.rows, raster.cols][mine] = raster.tissues[mine]
            muscles[k, raster.rows, raster.cols][mine] = raster.labels[mine]
            owner[raster.rows, raster.cols][mine] = i + 1
            best_depth[raster.rows, raster.cols][mine] = raster.depth_mm[mine]
        if len(sides) == 2:
            contact = _contact_line(owner)
            tissues[k][contact] = Tissue.SKIN
            muscles[k][contact] = 0
    return TissueMap(region, spec.table, tissues, muscles, (sx, sy, sz), origin)


def _contact_line(owner: np.ndarray) -> np.ndarray:
    """Pixels of leg 1 next to a pixel of leg 2: where pressed legs meet, skin meets skin."""
    first, second = owner == 1, owner == 2
    near_second = ndimage.binary_dilation(second, structure=ndimage.generate_binary_structure(2, 1))
    return first & near_second
