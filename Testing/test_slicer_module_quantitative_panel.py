"""The panel's Quantitative MRI section (quantitative_panel.py) through stand-ins for Qt, CTK and Slicer's
node selectors, as test_slicer_module_panel does for the .ui panel: the picks become the controller's
MapSelection, the Statistics button passes them on, and the buttons reach the controller. Real Qt
behaviour and looks need Slicer."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType, SimpleNamespace

import pytest
from test_slicer_module_panel import FakeWidget, _panel, gui  # noqa: F401 - gui is a fixture


class FakeLayout:
    def __init__(self, parent=None):
        self.rows = []

    def addRow(self, *items):  # noqa: N802 - Qt's names
        self.rows.append(items)

    def addWidget(self, widget, stretch=0):  # noqa: N802
        self.rows.append((widget,))


class FakeNodeSelector(FakeWidget):
    def __init__(self):
        super().__init__("selector")
        self.node = None

    def setMRMLScene(self, scene):  # noqa: N802
        self.scene = scene

    def currentNode(self):  # noqa: N802
        return self.node


class FakeButton(FakeWidget):
    def __init__(self, text=""):
        super().__init__(text)
        self.text = text


@pytest.fixture
def section_module(gui, monkeypatch):  # noqa: F811 - the imported fixture
    """The section's module imported against the stubs; ``.forms`` lists the form layouts it made."""
    qt = sys.modules["qt"]
    forms: list[FakeLayout] = []

    def form_layout(parent=None):
        forms.append(FakeLayout(parent))
        return forms[-1]

    for name, factory in {"QFormLayout": form_layout, "QHBoxLayout": FakeLayout, "QLineEdit": lambda: FakeWidget("edit"),
                          "QDoubleSpinBox": lambda: FakeWidget("spin"), "QPushButton": FakeButton,
                          "QCheckBox": FakeButton}.items():
        monkeypatch.setattr(qt, name, factory, raising=False)
    ctk = ModuleType("ctk")
    ctk.ctkCollapsibleButton = lambda: FakeWidget("section")
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    slicer = sys.modules["slicer"]
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", FakeNodeSelector, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", SimpleNamespace(), raising=False)
    sys.modules.pop("DafneSlicerLib.quantitative_panel", None)
    module = importlib.import_module("DafneSlicerLib.quantitative_panel")
    yield SimpleNamespace(QuantitativeSection=module.QuantitativeSection, forms=forms)
    sys.modules.pop("DafneSlicerLib.quantitative_panel", None)


def _buttons(layout: FakeLayout) -> dict[str, FakeButton]:
    found = {}
    for row in layout.rows:
        for item in row:
            if isinstance(item, FakeLayout):
                found |= _buttons(item)
            elif isinstance(item, FakeButton):
                found[item.text] = item
    return found


def test_picks_become_the_map_selection_the_statistics_button_passes(gui, section_module, tmp_path):  # noqa: F811
    panel, ui, _, parts = _panel(gui, tmp_path)
    layout = FakeLayout()
    section = section_module.QuantitativeSection(layout, panel.controller)
    empty = section.selection()
    assert empty.empty and empty.erode_mm is None  # "default" erosion
    assert empty.nan_as_missing is False  # NaN maps are refused unless the user says what NaN means
    water, fat, t2 = object(), object(), object()
    section.water.node, section.fat.node, section.map.node = water, fat, t2
    section.map_name.text = " T2 "
    section.erode.value = 1.5
    section.nan_as_missing.checked = True
    picked = section.selection()
    assert (picked.water, picked.fat, picked.fat_fraction) == (water, fat, None)
    assert picked.others == [("T2", t2)] and picked.erode_mm == 1.5 and picked.nan_as_missing is True

    seen = []
    panel.controller.statistics = lambda maps=None: seen.append(maps)
    panel.map_selection = section.selection
    ui.statisticsButton.clicked.emit()
    assert seen[-1].water is water and seen[-1].others == [("T2", t2)]


def test_section_buttons_reach_the_controller(gui, section_module, tmp_path):  # noqa: F811
    panel, _, _, _ = _panel(gui, tmp_path)
    calls = []
    panel.controller.cross_sectional_areas = lambda *args: calls.append("csa")
    panel.controller.export_dicom_seg = lambda path: calls.append(path)
    section_module.QuantitativeSection(FakeLayout(), panel.controller)
    buttons = _buttons(section_module.forms[-1])
    buttons["Cross-sectional areas"].clicked.emit()
    gui.dialogs.save_path = ""  # cancelled dialog: nothing exported
    buttons["Export DICOM SEG..."].clicked.emit()
    gui.dialogs.save_path = str(tmp_path / "seg.dcm")
    buttons["Export DICOM SEG..."].clicked.emit()
    assert calls == ["csa", str(tmp_path / "seg.dcm")]
    panel.controller.can_export_dicom_seg = lambda: False  # e.g. Slicer 5.10: no dialog, no export
    buttons["Export DICOM SEG..."].clicked.emit()
    assert calls == ["csa", str(tmp_path / "seg.dcm")]
