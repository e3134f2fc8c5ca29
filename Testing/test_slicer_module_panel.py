"""The module panel (widget.py) driven through stand-ins for Qt and Slicer's GUI helpers.

Every widget of the .ui file becomes a recording fake (so a name the panel uses but the .ui lacks
fails), ``qt`` and ``slicer`` are small stubs, and the controller behind the panel is the real
one with the controller tests' fakes. What this cannot show: real Qt signal/slot behaviour,
layouts, or how it looks; those need Slicer (DafneSlicerTest, manual check).
"""

from __future__ import annotations

import importlib
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from fakes import (
    FakeInstall,
    FakeLearning,
    FakeScene,
    FakeSegmentation,
    make_volume,
)

from dafne_logic.core.labels import LEG
from DafneSlicerLib.segmentation_logic import ModelChoice

UI_FILE = Path(__file__).resolve().parents[1] / "DafneSlicer" / "Resources" / "UI" / "DafneSlicer.ui"


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class FakeWidget:
    """Records what the panel sets; offers the signals and methods the panel uses."""

    def __init__(self, name):
        self.clicked, self.toggled, self.editingFinished = Signal(), Signal(), Signal()
        self.name, self.text, self.enabled, self._checked, self.visible, self.collapsed = name, "", True, False, True, False
        self.value, self.format, self.items, self.currentIndex, self.blocked = 0, "", [], -1, False
        self.rows, self.headers = {}, []
        self.named_signals: dict[str, Signal] = {}

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):  # as Qt: a change of state emits toggled, unless signals are blocked
        changed, self._checked = value != self._checked, value
        if changed and not self.blocked:
            self.toggled.emit(value)

    def connect(self, signature, slot):  # PythonQt's string-signature form
        self.named_signals.setdefault(signature, Signal()).connect(slot)

    def hide(self):
        self.visible = False

    def setVisible(self, visible):  # noqa: N802 - Qt's names below
        self.visible = visible

    def setFormat(self, text):  # noqa: N802
        self.format = text

    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text, data):  # noqa: N802
        self.items.append((text, data))

    def setCurrentIndex(self, index):  # noqa: N802
        self.currentIndex = index
        if not self.blocked and "currentIndexChanged(int)" in self.named_signals:
            self.named_signals["currentIndexChanged(int)"].emit(index)

    @property
    def currentData(self):  # noqa: N802
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None

    def blockSignals(self, block):  # noqa: N802
        previous, self.blocked = self.blocked, block
        return previous

    def setHorizontalHeaderLabels(self, labels):  # noqa: N802
        self.headers = list(labels)

    def setRowCount(self, n):  # noqa: N802
        self.rows = {r: self.rows.get(r, {}) for r in range(n)}

    def setItem(self, row, column, item):  # noqa: N802
        self.rows[row][column] = item.text

    def resizeColumnsToContents(self):  # noqa: N802
        pass


class FakeTimer:
    def __init__(self):
        self.timeout, self.active, self.interval, self.single_shot = Signal(), False, 0, False

    def setInterval(self, ms):  # noqa: N802
        self.interval = ms

    def setSingleShot(self, flag):  # noqa: N802
        self.single_shot = flag

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        assert self.active, "timer fired while stopped"
        if self.single_shot:
            self.active = False
        self.timeout.emit()


class FakeObserver:
    def __init__(self):
        self.observed = []

    def addObserver(self, node, event, callback):  # noqa: N802
        self.observed.append((node, event, callback))

    def removeObserver(self, node, event, callback):  # noqa: N802
        self.observed.remove((node, event, callback))


@pytest.fixture
def gui(monkeypatch, tmp_path):
    """Stub ``qt`` and ``slicer`` while the panel module is imported and used; restore the real modules after."""
    timers, dialogs, messages = [], SimpleNamespace(save_path=""), SimpleNamespace(errors=[], statuses=[])
    qt = ModuleType("qt")
    qt.QTimer = lambda: timers.append(FakeTimer()) or timers[-1]
    qt.QTableWidgetItem = lambda text: SimpleNamespace(text=text)
    qt.QFileDialog = SimpleNamespace(getSaveFileName=lambda *args: dialogs.save_path)
    slicer = ModuleType("slicer")
    slicer.util = SimpleNamespace(showStatusMessage=lambda text, ms: messages.statuses.append(text),
                                  errorDisplay=lambda text, windowTitle: messages.errors.append(text))
    slicer.vtkSegmentation = SimpleNamespace(SourceRepresentationModified=62100, SegmentModified=62104,
                                             SegmentAdded=62101, SegmentRemoved=62102)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    package = importlib.import_module("DafneSlicerLib")
    names = ["widget", "slicer_scene", "mrml_conversion"]
    saved = {name: sys.modules.pop(f"DafneSlicerLib.{name}", None) for name in names}
    try:
        widget = importlib.import_module("DafneSlicerLib.widget")
        yield SimpleNamespace(widget=widget, timers=timers, dialogs=dialogs, messages=messages)
    finally:
        for name, module in saved.items():  # modules bound to the stubs must not outlive the test
            sys.modules.pop(f"DafneSlicerLib.{name}", None)
            if module is not None:
                sys.modules[f"DafneSlicerLib.{name}"] = module
                setattr(package, name, module)
            elif hasattr(package, name):
                delattr(package, name)


def _panel(gui, tmp_path, install=None):
    from DafneSlicerLib.controller import DafneController
    from DafneSlicerLib.jobs import BackgroundJob
    from DafneSlicerLib.sync_logic import SyncLogic
    from DafneSlicerLib.worker import run_request

    names = {w.get("name") for w in ET.parse(UI_FILE).iter("widget")}
    ui = SimpleNamespace(**{name: FakeWidget(name) for name in names})
    parameters = SimpleNamespace(inputVolume=make_volume(), modelName="leg", device="cpu", singleLegSide="auto",
                                 segmentation=None)
    parts = SimpleNamespace(scene=FakeScene(), segmentation=FakeSegmentation(), learning=FakeLearning(),
                            sync=SyncLogic(tmp_path / "sync.json"), observer=FakeObserver())

    def controller_factory(view):
        def start_job(task, request):
            return BackgroundJob(task, lambda p, c: run_request(request, p, c, parts.segmentation, parts.learning,
                                                                parts.sync)).start()
        return DafneController(view, parts.scene, install or FakeInstall(), parts.segmentation, parts.sync,
                               start_job=start_job)

    panel = gui.widget.DafneSlicerPanel(ui, lambda: parameters, parts.observer, controller_factory)
    return panel, ui, parameters, parts


def _finish_job(gui, panel):
    panel.controller.job.wait(30)
    poll_timer = gui.timers[0]
    poll_timer.fire()
    assert not poll_timer.active


def test_panel_start_state(gui, tmp_path):
    panel, ui, parameters, _ = _panel(gui, tmp_path)
    assert ui.modelComboBox.items == [("leg 1 (bundled)", "leg")] and ui.modelComboBox.currentData == "leg"
    assert ui.modelInfoLabel.text.startswith("Version 1 (bundled), 12 labels: extensor digitorum longus")
    assert ui.dependencyStatusLabel.text == "All required Python packages are installed."
    assert ui.dependenciesCollapsibleButton.collapsed
    assert not ui.progressBar.visible and not ui.cancelButton.visible
    assert "never leave this computer" in ui.whatIsSentLabel.text
    assert ui.shareCheckBox.enabled and not ui.shareCheckBox.checked
    assert not ui.contributeButton.enabled and not ui.checkUpdatesButton.enabled and not ui.tokenLineEdit.enabled
    assert ui.diceTable.headers == ["Muscle", "Dice automatic", "Dice improved"]



def test_panel_passes_the_single_leg_side_parameter(gui, tmp_path):
    panel, ui, parameters, parts = _panel(gui, tmp_path)
    parameters.singleLegSide = "left"
    ui.segmentButton.clicked.emit()
    _finish_job(gui, panel)
    assert parts.segmentation.sides == ["left"]

def test_panel_segment_edit_mark_improve_statistics(gui, tmp_path):
    panel, ui, parameters, parts = _panel(gui, tmp_path)
    areas, dicom = FakeWidget("Cross-sectional areas"), FakeWidget("Export DICOM SEG...")
    panel.extra_action_buttons = [areas, dicom]  # the Quantitative MRI section's, as DafneSlicer.py hands them over
    ui.segmentButton.clicked.emit()
    assert not ui.segmentButton.enabled and ui.cancelButton.visible and ui.progressBar.visible
    assert not areas.enabled and not dicom.enabled and not ui.modelComboBox.enabled
    _finish_job(gui, panel)
    assert ui.segmentButton.enabled and not ui.cancelButton.visible
    assert areas.enabled and dicom.enabled and ui.modelComboBox.enabled
    assert ui.statusLabel.text.startswith("Segmented 'calf' with leg 1")
    node = panel.controller.case.segmentation_node
    assert parameters.segmentation is node
    assert sorted(event for n, event, _ in parts.observer.observed if n is node) == [62100, 62101, 62102, 62104]

    node.labels[2, 0, 0] = LEG.value_of(3, "left")  # a paint stroke, then its event
    edit_timer = gui.timers[1]
    parts.observer.observed[0][2](node, "SourceRepresentationModified")
    assert edit_timer.active
    edit_timer.fire()
    assert ui.reviewLabel.text.startswith("Changed slices: 2. Reviewed: none.")
    ui.slicesLineEdit.text = "4"
    ui.markSlicesButton.clicked.emit()
    assert ui.reviewLabel.text.startswith("Changed slices: 2. Reviewed: 4.")

    child = ModelChoice("leg-1.local-abc", "leg", "leg-1.local-abc (user)", "1.local-abc", "user", ())
    parts.segmentation.list_models = lambda: [*FakeSegmentation().list_models(), child]  # the registry lists it
    assert ui.modelComboBox.currentData == "leg"
    ui.improveButton.clicked.emit()
    _finish_job(gui, panel)
    assert ui.diceTable.rows == {0: {0: "right soleus", 1: "0.800", 2: "0.900"}}
    assert ui.modelComboBox.currentData == "leg-1.local-abc" and parameters.modelName == "leg-1.local-abc"
    assert parts.learning.finetuned[0][0] == [2, 4]

    ui.statisticsButton.clicked.emit()
    assert parts.scene.tables[-1][0] == "calf muscle statistics"
    gui.dialogs.save_path = str(tmp_path / "stats.csv")
    ui.exportStatisticsButton.clicked.emit()
    assert (tmp_path / "stats.csv").is_file() and ui.statusLabel.text.endswith("stats.csv.")
    assert not gui.messages.errors


def test_share_settings_saved_earlier_survive_the_panel_filling_its_fields(gui, tmp_path):
    """Sharing set up earlier (the CLI, an older Slicer); the panel opens before the packages are
    installed, so it can fill its fields only after the install. Ticking the box emits toggled in
    Qt, whose save must not write the fields still empty."""
    from DafneSlicerLib.sync_logic import SyncLogic

    SyncLogic(tmp_path / "sync.json").save(True, "https://dafne.example.org", "token-1")
    panel, ui, _, parts = _panel(gui, tmp_path, install=FakeInstall(missing=["torch"]))
    assert not ui.shareCheckBox.enabled and not ui.shareCheckBox.checked
    ui.installButton.clicked.emit()
    saved = parts.sync.load()
    assert (saved.opt_in, saved.server_url, saved.token) == (True, "https://dafne.example.org", "token-1")
    assert ui.shareCheckBox.checked and ui.serverUrlLineEdit.text == "https://dafne.example.org"
    assert ui.contributeButton.enabled
    ui.shareCheckBox.checked = False  # the user's own click still saves
    assert not parts.sync.load().opt_in and parts.sync.load().server_url == "https://dafne.example.org"


def test_panel_share_settings_and_errors(gui, tmp_path):
    panel, ui, _, parts = _panel(gui, tmp_path)
    ui.serverUrlLineEdit.text = "http://dafne.example.org"
    ui.shareCheckBox.checked = True
    assert gui.messages.errors == ["The server URL must use https:// (plain http only for localhost)."]
    assert ui.contributeButton.enabled  # the box is ticked; the URL is what was refused
    ui.serverUrlLineEdit.text = "https://dafne.example.org"
    ui.tokenLineEdit.text = "token-1"
    ui.tokenLineEdit.editingFinished.emit()
    config = parts.sync.load()
    assert (config.opt_in, config.server_url, config.token) == (True, "https://dafne.example.org", "token-1")
    ui.contributeButton.clicked.emit()
    assert gui.messages.errors[-1] == "Segment a volume first."
    ui.shareCheckBox.checked = False
    assert not ui.contributeButton.enabled and not parts.sync.load().opt_in
    np.testing.assert_equal(ui.statusLabel.text, "Segment a volume first.")
