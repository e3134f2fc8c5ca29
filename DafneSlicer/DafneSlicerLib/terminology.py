"""The module's own Slicer terminology: the muscles of the bundled label tables, coded.

Slicer's terminology picker offers only the types of the terminology contexts it has loaded; the
muscles' SNOMED CT codes are not in its bundled "3D Slicer General Anatomy list". So the module
ships ``Resources/Terminology/DafneSlicer-muscles.term.json`` (category "Anatomical Structure",
one type per muscle with its colour, laterality right/left as modifiers) and loads it when Slicer
has started, as SlicerTotalSegmentator does. Segments made by DafneSlicer name this context
(``dafne_logic.core.io.TERMINOLOGY_CONTEXT``), so the picker shows their muscle and side and an
edited segment keeps its codes.

The file is generated from the label tables (``python DafneSlicer/DafneSlicerLib/terminology.py``),
and a test checks that the shipped file is what the tables give.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dafne_logic.core.io import TERMINOLOGY_CONTEXT
from dafne_logic.core.labels import ANATOMICAL_STRUCTURE, LATERALITY, LEG, SIDES, THIGH, Code, LabelTable, Muscle

TERMINOLOGY_FILE = Path(__file__).resolve().parents[1] / "Resources" / "Terminology" / "DafneSlicer-muscles.term.json"
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"


def _code(code: Code) -> dict[str, str]:
    return {"CodingSchemeDesignator": code.scheme, "CodeValue": code.value, "CodeMeaning": code.meaning}


def _muscle_type(muscle: Muscle) -> dict[str, Any]:
    return {**_code(muscle.code), "recommendedDisplayRGBValue": list(muscle.color), "paired": "Y",
            "Modifier": [{**_code(LATERALITY[side]), "recommendedDisplayRGBValue": list(muscle.color),
                          "3dSlicerLabel": f"{side} {muscle.name}"} for side in SIDES]}


def terminology_context(tables: Iterable[LabelTable] = (THIGH, LEG)) -> dict[str, Any]:
    """The ``.term.json`` content (dcmqi segment-context schema) for the muscles of ``tables``.

    One type per SNOMED CT code, sorted by meaning: Slicer identifies a type by its code, so muscles
    that share one (both heads of the biceps femoris are "Entire biceps femoris muscle") share the
    type of the first of them; their segments still tell them apart by name.
    """
    types: dict[str, dict[str, Any]] = {}
    for table in tables:
        for muscle in table.muscles:
            types.setdefault(muscle.code.value, _muscle_type(muscle))
    category = {**_code(ANATOMICAL_STRUCTURE), "showAnatomy": False,
                "Type": sorted(types.values(), key=lambda t: t["CodeMeaning"])}
    return {"SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT, "@schema": SCHEMA,
            "SegmentationCodes": {"Category": [category]}}


def terminology_json() -> str:
    """The text of the shipped file."""
    return json.dumps(terminology_context(), indent=2) + "\n"


def load_terminology(terminologies_logic: Any, path: Path = TERMINOLOGY_FILE) -> str:
    """Load the muscles' context into Slicer's Terminologies module logic
    (``slicer.modules.terminologies.logic()``) unless it is there already (start-up and the first
    opening of the module both ask); returns the context name."""
    if path == TERMINOLOGY_FILE and terminologies_logic.IsTerminologyContextLoaded(TERMINOLOGY_CONTEXT):
        return TERMINOLOGY_CONTEXT
    return terminologies_logic.LoadTerminologyFromFile(str(path))


if __name__ == "__main__":  # regenerate the shipped file after a label table changed
    TERMINOLOGY_FILE.parent.mkdir(parents=True, exist_ok=True)
    TERMINOLOGY_FILE.write_text(terminology_json(), encoding="utf-8")
