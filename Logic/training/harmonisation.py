"""Label harmonisation: label maps of any scheme → per-leg anatomy slices in a model's label space.

Training anatomy comes from label maps whose schemes differ from the model's table:

* the 11-label thigh maps (both legs share values 1..11, no adductor longus) — legs are split by
  geometry (patient right has smaller x in LPS);
* MuscleMap whole-body maps (``{anatomy, side, value}`` JSON) — thigh muscles, adductor brevis and
  pelvic muscles that our tables lack, calf *compartments* and one gastrocnemius;
* label maps with a JSON table beside them (ours, ``{"1": "Soleus_R"}``, or the Visible Human
  maps' ``{"1": "right soleus"}`` with every lower-limb muscle by name).

Each source label is matched **by name** to one of:

* a model class (a muscle of the table);
* a **coarse group** of model classes (``gastrocnemius`` = medialis + lateralis; ``anterior
  compartment`` = tibialis anterior + extensor digitorum longus): the target holds the group's code
  and :class:`PartialLabelLoss` sums the fine probabilities inside it (marginal loss);
* a **part** of a model class (``peroneus longus`` is part of the model's peroneus): the class, and
  while the source lacks the other part (``peroneus brevis``) its unlabelled pixels may hide it;
* other muscle (a muscle the table does not have, named in :data:`OTHER_MUSCLES` or in another
  built-in table — tibialis posterior, the long flexors, popliteus, plantaris, extensor hallucis
  longus, tensor fasciae latae, pectineus, hip muscles; or any muscle of a whole-body scheme):
  background for the network, muscle for synthesis;
* bone.

Muscles of the table that a source never labels (adductor longus in the 11-label maps) may hide in
its unlabelled interior: those pixels get an *ambiguity group* {background, missing muscles}, so
the loss neither teaches "background" there nor guesses the muscle. A muscle that a source labels
on one leg but not on the other (a missing mesh of the Visible Human maps: the male right rectus
femoris and sartorius, the female right biceps femoris long head) is **unknown on that leg**: every
unlabelled pixel within :data:`MISSING_MARGIN_MM` of that leg's structures gets the ambiguity group
{background, missing muscles}, so the loss never calls the missing muscle background.

Outputs are :class:`LegSlice` canvases at the model's in-plane spacing, in the orientation the
network sees (rows anterior→posterior, columns patient right→left, the left leg mirrored), holding
a *tissue* map (what synthesis paints) and a *target* map (what the loss wants).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from dafne_logic.core.errors import InputError
from dafne_logic.core.io import label_table_path, match_label_name, read_header, read_label_names, read_label_volume, split_side
from dafne_logic.core.labels import BUILTIN_TABLES, SIDES, LabelTable, Side, normalise_name
from dafne_logic.phantoms.anatomy import Tissue

log = logging.getLogger(__name__)

# --- tissue codes painted by synthesis (values of LegSlice.tissue) --------------------------------
# 0..8 are the phantom's Tissue classes (background, skin, fat, ..., unlabelled muscle, vessels).
HOLE = 9  # unlabelled interior of the muscle compartment (fat, vessels or unlabelled muscle)
HOLE_LARGEST = 10  # the largest such hole of a slice: often the femur or the tibia
BONE = 11  # a labelled bone (cortex and marrow are drawn by synthesis)
MUSCLE_BASE = 32  # MUSCLE_BASE + k: labelled muscle of model class k, or of coarse group code k
LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Source names that denote several model classes at once, per region (matched by normalised name).
COARSE_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "leg": {
        "gastrocnemius": ("gastrocnemius medialis", "gastrocnemius lateralis"),
        "anterior compartment": ("tibialis anterior", "extensor digitorum longus"),
        "lateral compartment": ("peroneus",),
    },
}
# Coarse groups that also hold muscles no table segments, which are background for the network: the
# anterior compartment's extensor hallucis longus and peroneus tertius (labelled apart, and so
# background, in the Visible Human maps). Their pixels may be a member or background.
GROUPS_WITH_UNSEGMENTED_MUSCLES: dict[str, frozenset[str]] = {"leg": frozenset({"anterior compartment"})}
BONE_NAMES = {"tibia", "fibula", "femur", "bone", "patella"}

# Parts of a model muscle that sources may label separately (normalised name -> the part's name).
MUSCLE_PARTS: dict[str, dict[str, str]] = {
    "peroneus": {"peroneus longus": "longus", "peroneus brevis": "brevis",
                 "fibularis longus": "longus", "fibularis brevis": "brevis"},
}

# Lower-limb and hip muscles that no built-in table segments: muscle for synthesis, background for
# the network (muscles of the other built-in table count too, see _other_muscle_names).
OTHER_MUSCLES = frozenset({
    "tibialis posterior", "flexor digitorum longus", "flexor hallucis longus", "popliteus", "plantaris",
    "extensor hallucis longus", "tensor fasciae latae", "pectineus", "adductor brevis", "gluteus maximus",
    "gluteus medius", "gluteus minimus", "iliacus", "psoas major", "psoas minor", "iliopsoas", "piriformis",
    "obturator internus", "obturator externus", "superior gemellus", "inferior gemellus", "quadratus femoris",
    "peroneus tertius", "fibularis tertius",
})
MISSING_MARGIN_MM = 20.0  # how far from a leg's structures a muscle missing on that leg may lie
PART_MARGIN_MM = 10.0  # how far from a labelled part (and the bones) the unlabelled part may lie

# The thigh maps of the Multimodal-Multiethnic thigh dataset: values 1..11, both legs alike.
THIGH11_NAMES = {
    1: "sartorius", 2: "rectus femoris", 3: "vastus lateralis", 4: "vastus intermedius", 5: "vastus medialis",
    6: "adductor magnus", 7: "gracilis", 8: "biceps femoris long head", 9: "semitendinosus",
    10: "semimembranosus", 11: "biceps femoris short head",
}


@dataclass(frozen=True)
class SourceLabel:
    """One label of a source scheme: its name and, when the scheme says, its side."""

    name: str
    side: Side | None


@dataclass(frozen=True)
class LabelScheme:
    """How the values of one label map are named. ``whole_body``: names outside the region's
    vocabulary are other muscles (not an error), as in MuscleMap's whole-body maps."""

    labels: dict[int, SourceLabel]
    source: str
    whole_body: bool = False


@dataclass
class GroupRegistry:
    """Coarse and ambiguity groups of model classes met so far; group ``g`` has target code
    ``n_classes + g``. Shared by every source of a training run and by its loss."""

    n_classes: int
    groups: list[frozenset[int]] = field(default_factory=list)

    def code(self, classes: frozenset[int]) -> int:
        """Target code of a set of model classes (a single class is its own code)."""
        if len(classes) == 1 and 0 not in classes:
            return next(iter(classes))
        if classes not in self.groups:
            self.groups.append(classes)
        return self.n_classes + self.groups.index(classes)


@dataclass(frozen=True)
class LegSlice:
    """One leg of one axial slice, ready for synthesis.

    ``tissue`` and ``target`` are (H, W) uint8 canvases at the model spacing, the leg centred,
    rows anterior→posterior, columns lateral→medial for a right leg (the left leg mirrored).
    ``complete``: the tissue map already has skin and subcutaneous fat (phantoms); otherwise
    synthesis grows them around the muscles.
    """

    subject: str
    side: Side
    z_mm: float
    tissue: np.ndarray
    target: np.ndarray
    complete: bool = False


# --- schemes ---------------------------------------------------------------------------------------


def _musclemap_scheme(path: Path) -> LabelScheme | None:
    """A folder-level MuscleMap table (``{"labels": [{"anatomy", "side", "value"}, ...]}``) or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    entries = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"anatomy", "value"} <= set(e) for e in entries):
        return None
    labels = {int(e["value"]): SourceLabel(normalise_name(str(e["anatomy"])),
                                           e.get("side") if e.get("side") in SIDES else None) for e in entries}
    return LabelScheme(labels, str(path), whole_body=True)


def scheme_for(path: Path, values: set[int]) -> LabelScheme:
    """The naming of a label map's values: its JSON table beside it, a MuscleMap table in its folder,
    or (values within 1..11 and no table) the 11-label thigh scheme.

    Raises:
        InputError: no table can be found, or the table does not name every value present.
    """
    sidecar = label_table_path(path)
    scheme: LabelScheme | None = None
    if sidecar.is_file():
        labels = {value: SourceLabel(*split_side(name)) for value, name in read_label_names(sidecar).items()}
        scheme = LabelScheme(labels, str(sidecar))
    else:
        for candidate in sorted(path.parent.glob("*.json")):
            scheme = _musclemap_scheme(candidate)
            if scheme is not None:
                break
    if scheme is None:
        if values <= set(THIGH11_NAMES):
            return LabelScheme({v: SourceLabel(n, None) for v, n in THIGH11_NAMES.items()}, "11-label thigh scheme")
        raise InputError(f"{path}: no label table beside it ({sidecar.name}) and its values are not the 11-label "
                         f"thigh scheme; add a JSON table naming each value")
    unknown = sorted(values - set(scheme.labels))
    if unknown:
        raise InputError(f"{path}: label values {unknown[:8]} are not named in {scheme.source}")
    return scheme


# --- names → codes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """Tissue code and target code of each source value, plus what the source leaves unknown.

    ``missing``: classes the source never labels (they may hide in its unlabelled interior);
    ``incomplete``: classes labelled only in part (``peroneus longus`` without ``brevis``);
    ``missing_on``: per side, classes labelled on the other leg only (a missing structure)."""

    tissue: dict[int, int]
    target: dict[int, int]
    side: dict[int, Side | None]
    missing: frozenset[int]
    incomplete: frozenset[int] = frozenset()
    missing_on: dict[Side, frozenset[int]] = field(default_factory=dict)

    def unknown(self, side: Side) -> frozenset[int]:
        """Classes that unlabelled pixels of a ``side`` leg may belong to (besides background)."""
        return self.missing | self.incomplete | self.missing_on.get(side, frozenset())


def _other_muscle_names(table: LabelTable) -> frozenset[str]:
    """Muscles that are not the table's: :data:`OTHER_MUSCLES` and the other built-in tables' muscles."""
    own = {normalise_name(m.name) for m in table.muscles}
    builtin = {normalise_name(m.name) for t in BUILTIN_TABLES.values() for m in t.muscles}
    parts = {part for whole, names in MUSCLE_PARTS.items() if whole not in own for part in names}
    return frozenset((OTHER_MUSCLES | builtin | parts) - own)


def _part_of(name: str, table: LabelTable) -> tuple[int, str, frozenset[str]] | None:
    """(model class, this part, every part of it) when ``name`` is a part of one of the table's
    muscles, else None."""
    for whole, parts in MUSCLE_PARTS.items():
        if name in parts and normalise_name(whole) in {normalise_name(m.name) for m in table.muscles}:
            return table.muscle_index(whole), parts[name], frozenset(parts.values())
    return None


def harmonise(scheme: LabelScheme, table: LabelTable, registry: GroupRegistry) -> Mapping:
    """Match every label of ``scheme`` to ``table`` by name (see the module docstring).

    Raises:
        InputError: a name that is neither a muscle of the table, a part of one, a coarse group, a
            bone nor another known muscle (any muscle, for whole-body schemes); or a source that
            names no muscle of the table.
    """
    groups = {normalise_name(k): v for k, v in COARSE_GROUPS.get(table.region, {}).items()}
    with_background = {normalise_name(k) for k in GROUPS_WITH_UNSEGMENTED_MUSCLES.get(table.region, frozenset())}
    others = _other_muscle_names(table)
    tissue, target, side_of = {}, {}, {}
    covered: set[int] = set()
    covered_on: dict[Side | None, set[int]] = {None: set(), "right": set(), "left": set()}
    parts_seen: dict[int, set[str]] = {}
    parts_needed: dict[int, frozenset[str]] = {}
    whole: set[int] = set()
    unknown = []
    for value, label in scheme.labels.items():
        side_of[value] = label.side
        probe = f"{label.side or 'right'} {label.name}"
        matched = match_label_name(probe, table)
        part = _part_of(label.name, table) if matched is None else None
        if matched is not None or part is not None:
            if matched is not None:
                k = matched if matched <= table.n_muscles else matched - table.n_muscles
                whole.add(k)
            else:
                k, piece, parts_needed[k] = part  # type: ignore[misc]
                parts_seen.setdefault(k, set()).add(piece)
            tissue[value], target[value] = MUSCLE_BASE + k, k
            covered.add(k)
            covered_on[label.side].add(k)
        elif label.name in groups:
            members = frozenset(table.muscle_index(n) for n in groups[label.name])
            code = registry.code(members | {0} if label.name in with_background else members)
            tissue[value], target[value] = MUSCLE_BASE + code, code
            covered |= members
            covered_on[label.side] |= members
        elif any(word in BONE_NAMES for word in label.name.split()):
            tissue[value], target[value] = BONE, 0
        elif scheme.whole_body or label.name in others:
            tissue[value], target[value] = int(Tissue.MUSCLE), 0
        else:
            unknown.append(label.name)
    if unknown:
        raise InputError(f"{scheme.source}: labels {unknown[:4]} are not muscles of the {table.region} table "
                         f"({', '.join(m.name for m in table.muscles)})")
    if not covered:
        raise InputError(f"{scheme.source}: names no muscle of the {table.region} table")
    # Classes given as parts are complete only when every part of them is labelled.
    incomplete = frozenset(k for k, seen in parts_seen.items() if k not in whole and seen != parts_needed[k])
    missing_on: dict[Side, frozenset[int]] = {}
    if covered_on["right"] or covered_on["left"]:
        for side, other in (("right", "left"), ("left", "right")):
            missing_on[side] = frozenset(covered_on[other] - covered_on[side] - covered_on[None])
    return Mapping(tissue, target, side_of, frozenset(range(1, table.n_classes)) - covered, incomplete, missing_on)


# --- label maps → leg slices -----------------------------------------------------------------------


def subject_id(path: Path) -> str:
    """Subject of a label map file: ``THIGH_NNN`` (one subject may appear under several contrasts),
    else the file name without suffixes or a trailing ``_labels``/``_NNNN``."""
    match = re.search(r"(THIGH_\d+)", path.name)
    if match:
        return match.group(1)
    stem = path.name
    for suffix in LABEL_MAP_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"(_labels|_\d{4})$", "", stem)


def find_label_maps(paths: list[Path]) -> list[Path]:
    """Label map files among ``paths`` (files, or folders searched recursively).

    In folders, images with floating-point voxels are skipped (a folder may hold images beside
    their label maps). Raises :class:`InputError` for a missing path, an empty or unreadable
    file with a label-map suffix (named), or when nothing is found.
    """
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if path.is_file():
            found.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            if candidate.is_file() and candidate.name.lower().endswith(LABEL_MAP_SUFFIXES):
                if read_header(candidate, "a label map").GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
                    found.append(candidate)
    if not found:
        raise InputError(f"no label maps found in {', '.join(str(p) for p in paths)}")
    return found


def _read_label_map(path: Path) -> sitk.Image:
    image = read_label_volume(path)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkInt32)
    return sitk.DICOMOrient(image, "LPS")


def _resample_in_plane(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Nearest-neighbour resampling of (x, y) to ``spacing_mm``; slices kept."""
    sx, sy, sz = image.GetSpacing()
    nx, ny, nz = image.GetSize()
    size = [max(1, int(round(nx * sx / spacing_mm))), max(1, int(round(ny * sy / spacing_mm))), nz]
    origin = image.TransformContinuousIndexToPhysicalPoint((-0.5 + spacing_mm / sx / 2, -0.5 + spacing_mm / sy / 2, 0))
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin,
                         (spacing_mm, spacing_mm, sz), image.GetDirection(), 0, image.GetPixelID())


def _split_column(mask: np.ndarray) -> int | None:
    """Column separating two legs in a (z, y, x) mask: the emptiest column between the two
    2-means centres of the mask's column profile; None when only one leg is present."""
    profile = mask.sum(axis=(0, 1)).astype(np.float64)
    cols = np.nonzero(profile)[0]
    if cols.size < 2:
        return None
    centres = np.array([cols[0], cols[-1]], dtype=np.float64)
    for _ in range(20):
        split = centres.mean()
        left, right = cols[cols <= split], cols[cols > split]
        if left.size == 0 or right.size == 0:
            return None
        centres = np.array([np.average(left, weights=profile[left]), np.average(right, weights=profile[right])])
    a, b = int(centres[0]), int(centres[1])
    between = profile[a:b + 1]
    if between.min() > 0.2 * profile.max():
        return None  # no valley: one leg
    return a + int(np.argmin(between))


def _disk(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px ** 2


def _fill_holes(tissue: np.ndarray, target: np.ndarray, spacing_mm: float, ambiguous_code: int) -> None:
    """Mark the unlabelled interior of the compartment as HOLE / HOLE_LARGEST (in place)."""
    solid = tissue > 0
    pad = int(np.ceil(6.0 / spacing_mm))
    closed = ndimage.binary_closing(np.pad(solid, pad), structure=_disk(max(1, int(round(4.0 / spacing_mm)))))
    interior = ndimage.binary_fill_holes(closed)[pad:-pad, pad:-pad] & ~solid
    components, n = ndimage.label(interior)
    if n == 0:
        return
    sizes = ndimage.sum_labels(interior, components, index=np.arange(1, n + 1))
    tissue[interior] = HOLE
    target[interior] = ambiguous_code
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] * spacing_mm ** 2 >= 80.0:
        tissue[components == largest] = HOLE_LARGEST


def _canvas(array: np.ndarray, centre: tuple[int, int], size: tuple[int, int], mirror: bool) -> np.ndarray:
    """(H, W) crop of ``array`` centred on ``centre`` (zero outside), mirrored along x if asked."""
    out = np.zeros(size, dtype=array.dtype)
    y0, x0 = centre[0] - size[0] // 2, centre[1] - size[1] // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(array.shape[0], y0 + size[0]), min(array.shape[1], x0 + size[1])
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = array[ys:ye, xs:xe]
    return out[:, ::-1].copy() if mirror else out


def _mark_unknown_near(tissue: np.ndarray, target: np.ndarray, around: np.ndarray, margin_px: float,
                       code: int) -> None:
    """Give ``code`` to unlabelled pixels (no structure of the source, holes included) within
    ``margin_px`` of ``around`` (in place): where a structure missing on this leg, or the missing
    part of a muscle, may lie. Labelled muscles and bones are known not to be it."""
    if not around.any():
        return
    near = ndimage.distance_transform_edt(~around) <= margin_px
    target[near & np.isin(tissue, (0, HOLE, HOLE_LARGEST))] = code


def leg_slices_from_codes(tissue_volume: np.ndarray, target_volume: np.ndarray, side_volume: np.ndarray,
                          subject: str, spacing_mm: float, z_mm: np.ndarray, canvas: tuple[int, int],
                          ambiguous_code: int | dict[Side, int], min_classes: int, complete: bool = False,
                          missing_on: frozenset[Side] = frozenset(),
                          incomplete: frozenset[int] = frozenset()) -> list[LegSlice]:
    """Cut per-leg canvases from canonical (z, y, x) code volumes at the model spacing.

    ``side_volume`` holds 1 for the right leg, 2 for the left, 0 for neither. Slices of a leg with
    fewer than ``min_classes`` distinct targets of the table are skipped. ``ambiguous_code`` (one,
    or one per side) is the target of the leg's unlabelled interior; it also covers the unlabelled
    pixels within :data:`MISSING_MARGIN_MM` of the leg's structures on the legs in ``missing_on``
    (a structure is missing there), and within :data:`PART_MARGIN_MM` of the classes in
    ``incomplete`` and of bones (the missing part of a muscle lies beside the labelled part, as the
    peroneus brevis beside the longus and the fibula).
    """
    codes = ambiguous_code if isinstance(ambiguous_code, dict) else dict.fromkeys(SIDES, ambiguous_code)
    out = []
    for z in range(tissue_volume.shape[0]):
        for side_code, side in ((1, "right"), (2, "left")):
            mine = side_volume[z] == side_code
            if not mine.any():
                continue
            # Work on the leg's bounding box plus room for hole closing and unknown margins.
            rows, cols = np.nonzero(mine)
            pad = int(np.ceil((max(MISSING_MARGIN_MM, PART_MARGIN_MM) + 8.0) / spacing_mm))
            box = (slice(max(0, rows.min() - pad), rows.max() + pad + 1),
                   slice(max(0, cols.min() - pad), cols.max() + pad + 1))
            mine = mine[box]
            tissue = np.where(mine, tissue_volume[z][box], 0).astype(np.uint8)
            target = np.where(mine, target_volume[z][box], 0).astype(np.uint8)
            if np.unique(target[target > 0]).size < min_classes:
                continue
            if not complete:
                _fill_holes(tissue, target, spacing_mm, codes[side])
            if incomplete:
                around = np.isin(target, list(incomplete)) | (tissue == BONE)
                _mark_unknown_near(tissue, target, around, PART_MARGIN_MM / spacing_mm, codes[side])
            if side in missing_on:
                _mark_unknown_near(tissue, target, tissue > 0, MISSING_MARGIN_MM / spacing_mm, codes[side])
            rows, cols = np.nonzero(tissue)
            centre = ((rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2)
            mirror = side == "left"
            out.append(LegSlice(subject, side, float(z_mm[z]), _canvas(tissue, centre, canvas, mirror),
                                _canvas(target, centre, canvas, mirror), complete))
    return out


def load_label_map(path: Path, table: LabelTable, registry: GroupRegistry, spacing_mm: float,
                   canvas: tuple[int, int], min_classes: int = 3) -> list[LegSlice]:
    """Per-leg anatomy slices of one label map, harmonised to ``table``.

    Raises:
        InputError: unreadable or empty file, values without names, names that do not fit the table.
    """
    image = _read_label_map(path)
    values = sitk.GetArrayFromImage(image).astype(np.int64)
    present = set(np.unique(values).tolist()) - {0}
    if not present:
        raise InputError(f"{path}: the label map is empty")
    if min(present) < 0:
        raise InputError(f"{path}: holds negative label values")
    scheme = scheme_for(path, present)
    mapping = harmonise(scheme, table, registry)
    ambiguous: dict[Side, int] = {side: registry.code(frozenset({0}) | mapping.unknown(side))
                                  if mapping.unknown(side) else 0 for side in SIDES}
    # A structure missing on one leg may lie anywhere near it, not only in enclosed holes.
    missing_on = frozenset(side for side in SIDES if mapping.missing_on.get(side))
    resampled = _resample_in_plane(image, spacing_mm)
    values = sitk.GetArrayFromImage(resampled).astype(np.int64)
    lut_size = int(values.max()) + 1
    tissue_lut = np.zeros(lut_size, np.uint8)
    target_lut = np.zeros(lut_size, np.uint8)
    side_lut = np.zeros(lut_size, np.uint8)
    for value in present:
        tissue_lut[value] = mapping.tissue[value]
        target_lut[value] = mapping.target[value]
        side = mapping.side[value]
        side_lut[value] = 0 if side is None else 1 + SIDES.index(side)
    sides = side_lut[values]
    sideless = (values > 0) & (sides == 0)
    if sideless.any():
        # Legs by geometry: canonical x grows towards the patient's left.
        split = _split_column(sideless)
        if split is None:
            centre_x = resampled.TransformContinuousIndexToPhysicalPoint(
                (float(np.nonzero(sideless)[2].mean()), 0.0, 0.0))[0]
            sides[sideless] = 1 if centre_x < 0 else 2
        else:
            by_column = np.where(np.arange(values.shape[2]) <= split, 1, 2).astype(np.uint8)
            sides[sideless] = np.broadcast_to(by_column, values.shape)[sideless]
    z_mm = np.array([resampled.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(values.shape[0])])
    slices = leg_slices_from_codes(tissue_lut[values], target_lut[values], sides, subject_id(path), spacing_mm,
                                   z_mm, canvas, ambiguous, min_classes, missing_on=missing_on,
                                   incomplete=mapping.incomplete)
    log.info("%s: %d leg slices (%s)%s", path, len(slices), scheme.source,
             "".join(f"; unknown on the {side} leg: {sorted(mapping.unknown(side))}" for side in SIDES
                     if mapping.unknown(side)))
    return slices


# --- the partial-label loss -----------------------------------------------------------------------


class PartialLabelLoss:
    """Dice + cross-entropy where a target may name a *set* of classes (marginal loss).

    Targets ``0..C-1`` are model classes; ``C + g`` means "one of ``groups[g]``". Cross-entropy
    uses the log of the summed probability of the allowed classes. Soft Dice (pooled over the
    batch, over the classes labelled somewhere in the batch) is computed per class on the pixels
    whose label decides that class (a pixel labelled
    "gastrocnemius" says nothing about medialis versus lateralis, so neither head's Dice sees it),
    plus, for each coarse group without background, on the group's summed probability. With no
    groups it is ordinary Dice + CE on softmax.
    """

    def __init__(self, n_classes: int, groups: list[frozenset[int]] | tuple[frozenset[int], ...] = (),
                 smooth: float = 1e-5):
        self.n_classes = n_classes
        self.smooth = smooth
        rows = [torch.nn.functional.one_hot(torch.tensor(c), n_classes).bool() for c in range(n_classes)]
        for group in groups:
            if not group or max(group) >= n_classes or min(group) < 0:
                raise ValueError(f"group {sorted(group)} outside classes 0..{n_classes - 1}")
            rows.append(torch.tensor([c in group for c in range(n_classes)]))
        self.allowed = torch.stack(rows)  # (C + G, C)
        self.dice_groups = [sorted(g) for g in groups if 0 not in g and len(g) > 1]

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if int(target.max()) >= self.allowed.shape[0] or int(target.min()) < 0:
            raise ValueError(f"target code {int(target.max())} outside 0..{self.allowed.shape[0] - 1}")
        log_p = torch.log_softmax(logits.float(), dim=1)
        p = log_p.exp()
        allowed = self.allowed.to(logits.device)[target].permute(0, 3, 1, 2)  # (B, C, H, W) bool
        ce = -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1).mean()
        single = allowed.sum(1, keepdim=True) == 1
        known = single | ~allowed  # pixels whose label decides each class
        y = (allowed & single).float()
        known_f = known.float()
        dims = (0, 2, 3)
        inter = (p * y * known_f).sum(dims)
        denominator = (p * known_f).sum(dims) + y.sum(dims)
        dice = 1 - (2 * inter + self.smooth) / (denominator + self.smooth)
        # Classes absent from the whole batch's labels are left to cross-entropy: their Dice would
        # be a constant ~1 until their probability vanishes everywhere, drowning the others.
        losses = [dice[y.sum(dims) > 0]]
        for members in self.dice_groups:
            q = p[:, members].sum(1)
            inside = allowed[:, members].any(1)
            y_g = (inside & ~allowed[:, [c for c in range(self.n_classes) if c not in members]].any(1)).float()
            known_g = (y_g.bool() | ~inside).float()
            inter_g = (q * y_g * known_g).sum()
            den_g = (q * known_g).sum() + y_g.sum()
            losses.append((1 - (2 * inter_g + self.smooth) / (den_g + self.smooth)).reshape(1))
        return ce + torch.cat(losses).mean()


# --- phantoms as anatomy ----------------------------------------------------------------------------


def phantom_leg_slices(table: LabelTable, n_subjects: int, seed: int, spacing_mm: float,
                       canvas: tuple[int, int], n_slices: int = 12) -> list[list[LegSlice]]:
    """Anatomy of procedural phantoms (:mod:`dafne_logic.phantoms.anatomy`), one source per subject.

    Phantoms are complete (skin, fat, bones, vessels, unlabelled muscle): synthesis only paints them.
    Their muscles must be those of ``table`` (the built-in thigh or leg table)."""
    from dafne_logic.phantoms.anatomy import phantom_tissue_map

    size = int(round(max(canvas) * 2.4))
    sources = []
    for k in range(n_subjects):
        anatomy = phantom_tissue_map(table.region, shape=(n_slices, size, size),
                                     spacing=(spacing_mm, spacing_mm, 8.0), seed=seed + k)
        if [m.name for m in anatomy.table.muscles] != [m.name for m in table.muscles]:
            raise InputError(f"phantoms of region {table.region!r} do not have the muscles of this label table")
        muscles = anatomy.muscles.astype(np.int64)
        classes = np.where(muscles > table.n_muscles, muscles - table.n_muscles, muscles)
        tissue = np.where(classes > 0, MUSCLE_BASE + classes, anatomy.tissues).astype(np.uint8)
        body = anatomy.tissues > 0
        sides = np.zeros(muscles.shape, np.uint8)
        columns = np.arange(size)[None, None, :]
        sides[body] = np.broadcast_to(np.where(columns < size // 2, 1, 2), muscles.shape)[body]
        z_mm = anatomy.origin[2] + np.arange(n_slices) * anatomy.spacing[2]
        sources.append(leg_slices_from_codes(tissue, classes.astype(np.uint8), sides, f"phantom_{seed + k}",
                                             spacing_mm, z_mm, canvas, 0, min_classes=2, complete=True))
    return sources
