"""Label tables: which muscles a model segments, their colours and SNOMED CT terminology.

Two label spaces exist and every module must keep them apart:

* **Model classes** (one leg): 0 = background, 1..N = the muscles of the table, in table order.
  The network sees one leg at a time, the left leg mirrored so that it looks like a right leg.
* **Volume labels** (both legs, what users see and files store): patient-right muscles take the
  values 1..N, patient-left muscles N+1..2N, in table order. Names read "right vastus lateralis".

Colours are RGB in 0..255. Terminology follows DICOM / 3D Slicer: category "Anatomical Structure",
a SNOMED CT type code per muscle and the laterality as a type modifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Side = Literal["right", "left"]
SIDES: tuple[Side, Side] = ("right", "left")


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM style triplet)."""

    scheme: str  # coding scheme designator, e.g. "SCT" for SNOMED CT
    value: str  # code value, e.g. "24028007"
    meaning: str  # human readable meaning, e.g. "Right"

    def to_json(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Code:
        return cls(str(data["scheme"]), str(data["value"]), str(data["meaning"]))


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
LATERALITY: dict[Side, Code] = {
    "right": Code("SCT", "24028007", "Right"),
    "left": Code("SCT", "7771000", "Left"),
}


@dataclass(frozen=True)
class Muscle:
    """One muscle of a label table (side-less)."""

    name: str  # lower-case English name, e.g. "vastus lateralis"
    color: tuple[int, int, int]  # RGB, 0..255
    code: Code  # SNOMED CT structure code of the muscle

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "color": list(self.color), "code": self.code.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Muscle:
        color = tuple(int(c) for c in data["color"])
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ValueError(f"muscle {data.get('name')!r}: colour must be three integers in 0..255")
        return cls(str(data["name"]), color, Code.from_json(data["code"]))


@dataclass(frozen=True)
class VolumeLabel:
    """One entry of the bilateral label map written to disk and shown in Slicer."""

    value: int  # voxel value in the label map
    muscle: Muscle
    side: Side

    @property
    def name(self) -> str:
        return f"{self.side} {self.muscle.name}"

    @property
    def laterality(self) -> Code:
        return LATERALITY[self.side]


@dataclass(frozen=True)
class LabelTable:
    """The muscles of one anatomical region, in model-class order."""

    region: str  # "thigh", "leg" or any name for a user-defined table
    muscles: tuple[Muscle, ...] = field(default_factory=tuple)

    @property
    def n_muscles(self) -> int:
        return len(self.muscles)

    @property
    def n_classes(self) -> int:
        """Model output channels: background + one per muscle."""
        return len(self.muscles) + 1

    def value_of(self, muscle_index: int, side: Side) -> int:
        """Volume label value of model class ``muscle_index`` (1..N) on ``side``."""
        if not 1 <= muscle_index <= self.n_muscles:
            raise ValueError(f"muscle index {muscle_index} outside 1..{self.n_muscles}")
        return muscle_index if side == "right" else muscle_index + self.n_muscles

    def volume_labels(self) -> list[VolumeLabel]:
        """All bilateral labels, right side first, ordered by value."""
        return [
            VolumeLabel(self.value_of(i, side), muscle, side)
            for side in SIDES
            for i, muscle in enumerate(self.muscles, start=1)
        ]

    def muscle_index(self, name: str) -> int:
        """Model class (1..N) of a muscle name, case- and separator-insensitive."""
        wanted = normalise_name(name)
        for i, muscle in enumerate(self.muscles, start=1):
            if normalise_name(muscle.name) == wanted:
                return i
        raise KeyError(f"no muscle named {name!r} in the {self.region} label table")

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "muscles": [m.to_json() for m in self.muscles]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelTable:
        muscles = tuple(Muscle.from_json(m) for m in data["muscles"])
        names = [normalise_name(m.name) for m in muscles]
        if len(set(names)) != len(names):
            raise ValueError("label table has duplicate muscle names")
        if not muscles:
            raise ValueError("label table has no muscles")
        return cls(str(data["region"]), muscles)

    @classmethod
    def load(cls, path: str) -> LabelTable:
        with open(path, encoding="utf-8-sig") as f:
            return cls.from_json(json.load(f))


def nothing_found_hint(region: str) -> str:
    """The sentence for a segmentation without a single muscle voxel (a scan of another body part,
    noise, the legs out of view): the empty result is written, but must not pass unnoticed."""
    part = {"leg": "calves", "thigh": "thighs"}.get(region, f"{region} region")
    return f"No muscle was found, so the segmentation is empty: is this an axial MR image of the {part}, with the muscles in view?"


def normalise_name(name: str) -> str:
    """Canonical form for matching names: lower case, words separated by single spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _table(region: str, rows: Iterable[tuple[str, tuple[int, int, int], str, str]]) -> LabelTable:
    return LabelTable(region, tuple(Muscle(n, c, Code("SCT", v, m)) for n, c, v, m in rows))


# SNOMED CT codes. 3D Slicer's own terminology files (SlicerGeneralAnatomy, DICOM-Master,
# AnatomicRegionAndModifier) list none of these muscles, so each code comes from another public
# file (sources below); the category "Anatomical Structure" (123037004) and the laterality
# modifiers Right (24028007) / Left (7771000) are as in Slicer's SlicerGeneralAnatomy list.
# Sources:
#   [FHIR]  HL7 FHIR R4 value set approach-site-codes / body-site (SNOMED CT body structures)
#   [TSEG]  SlicerTotalSegmentator, TotalSegmentator/Resources/totalsegmentator_snomed_mapping.csv
#   [UBER]  Uberon bridge to SNOMED CT (src/ontology/bridge/uberon-bridge-to-sctid.owl), whose
#           codes are "Entire ..." concepts; their meanings follow SNOMED's "Entire <x>" naming.
#   [SITE]  a public SNOMED CT injection-site table listing 72226001 "Rectus femoris structure".
# Where no public file gives a code for the muscle itself, the nearest real parent concept is used
# ("parent:" below); segment NAMES, not codes, tell such muscles apart.
THIGH = _table(
    "thigh",
    [
        ("vastus lateralis", (230, 25, 75), "1403006", "Vastus lateralis muscle"),  # [FHIR]
        ("vastus medialis", (60, 180, 75), "3478008", "Structure of vastus medialis muscle"),  # [FHIR]
        # parent: no public code for vastus intermedius found [TSEG]
        ("vastus intermedius", (255, 225, 25), "21989003", "Quadriceps femoris muscle"),
        ("rectus femoris", (0, 130, 200), "72226001", "Rectus femoris structure"),  # [SITE]
        ("sartorius", (245, 130, 48), "12595009", "Sartorius muscle"),  # [TSEG]
        ("gracilis", (145, 30, 180), "2577006", "Structure of gracilis muscle"),  # [FHIR]
        ("adductor magnus", (70, 240, 240), "181688002", "Entire adductor magnus muscle"),  # [UBER]
        ("adductor longus", (240, 50, 230), "181686003", "Entire adductor longus muscle"),  # [UBER]
        # parent: no public code for semimembranosus found [TSEG]
        ("semimembranosus", (210, 245, 60), "128511007", "Posterior muscle of thigh structure"),
        ("semitendinosus", (250, 190, 212), "181685004", "Entire semitendinosus muscle"),  # [UBER]
        # parent: no public code for either head of biceps femoris found [UBER]
        ("biceps femoris long head", (0, 128, 128), "181672002", "Entire biceps femoris muscle"),
        ("biceps femoris short head", (220, 190, 255), "181672002", "Entire biceps femoris muscle"),
    ],
)

LEG = _table(
    "leg",
    [
        ("soleus", (230, 25, 75), "181702007", "Entire soleus muscle"),  # [UBER]
        # parent: no public code for either head of gastrocnemius found [UBER]
        ("gastrocnemius medialis", (60, 180, 75), "181700004", "Entire gastrocnemius muscle"),
        ("gastrocnemius lateralis", (255, 225, 25), "181700004", "Entire gastrocnemius muscle"),
        ("tibialis anterior", (0, 130, 200), "181696007", "Entire tibialis anterior muscle"),  # [UBER]
        # parent: no public code for extensor digitorum longus found; its compartment [FHIR]
        ("extensor digitorum longus", (245, 130, 48), "4812002", "Anterior tibial compartment structure"),
        # Uberon "peroneus" = the fibularis longus, brevis and tertius group [UBER]
        ("peroneus", (145, 30, 180), "181694005", "Entire peroneal muscle group"),
    ],
)

BUILTIN_TABLES: dict[str, LabelTable] = {"thigh": THIGH, "leg": LEG}
