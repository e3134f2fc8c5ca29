"""The module's own terminology file, read by Slicer's real Terminologies logic (slicer-core): every
segment DafneSlicer makes names a type and side that the picker finds, with the muscle's colour."""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (part of the test extra)")

from dafne_logic.core.labels import LEG, THIGH  # noqa: E402
from DafneSlicerLib.mrml_conversion import terminology_entry  # noqa: E402
from DafneSlicerLib.terminology import TERMINOLOGY_FILE, load_terminology  # noqa: E402


def _loaded_types(logic, context: str) -> dict[str, tuple[tuple[int, ...], set[str]]]:
    """Type code value -> (recommended colour of its right modifier, modifier code values), as Slicer loaded them."""
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(context, 0, category)
    types = {}
    for n in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
        type_ = slicer.vtkSlicerTerminologyType()
        assert logic.GetNthTypeInTerminologyCategory(context, category, n, type_)
        modifiers = []
        for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_)):
            modifier = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeModifierInTerminologyType(context, category, type_, m, modifier)
            modifiers.append(modifier)
        types[type_.GetCodeValue()] = (tuple(modifiers[0].GetRecommendedDisplayRGBValue()),
                                       {modifier.GetCodeValue() for modifier in modifiers})
    return types


def test_every_segment_terminology_resolves_in_the_shipped_context():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = load_terminology(logic)
    assert context == "Segmentation category and type - DafneSlicer muscles"
    types = _loaded_types(logic, context)
    labels = THIGH.volume_labels() + LEG.volume_labels()
    assert len(types) == len({label.muscle.code.value for label in labels})
    for label in labels:
        stored = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(terminology_entry(label), stored)
        assert stored.GetTerminologyContextName() == context  # what a segment names: the loaded context
        assert stored.GetTypeObject().GetCodeValue() in types, label.name
        _, sides = types[stored.GetTypeObject().GetCodeValue()]
        assert sides == {"24028007", "7771000"} and stored.GetTypeModifierObject().GetCodeValue() in sides
    right_vastus_lateralis = slicer.vtkSlicerTerminologyEntry()  # the picker's search by Slicer label
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, "right vastus lateralis", right_vastus_lateralis)
    assert tuple(right_vastus_lateralis.GetTypeModifierObject().GetRecommendedDisplayRGBValue()) == \
        THIGH.muscles[0].color


def test_load_passes_the_shipped_file_to_slicer():
    class Recording:
        def IsTerminologyContextLoaded(self, name):  # noqa: N802 - Slicer's name
            return False

        def LoadTerminologyFromFile(self, path):  # noqa: N802 - Slicer's name
            self.path = path
            return "name"

    logic = Recording()
    assert load_terminology(logic) == "name" and logic.path == str(TERMINOLOGY_FILE)
