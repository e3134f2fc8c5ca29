"""The module panel: binds the .ui widgets to the controller and implements its :class:`View`.

Everything here is Qt plumbing; decisions live in :mod:`.controller`, MRML work in
:mod:`.slicer_scene`. The panel polls running jobs with a ``qt.QTimer`` and re-reads the
segmentation (debounced) when the user edits it, so the review summary follows the edits.
"""

from __future__ import annotations

import qt
import slicer

from .controller import DafneController
from .segmentation_logic import ModelChoice
from .slicer_scene import SEGMENTATION_EVENTS
from .sync_logic import TOKEN_NOTE, WHAT_IS_SENT

POLL_MS = 200  # job progress refresh
EDIT_DEBOUNCE_MS = 1000  # wait this long after the last edit before re-reading the segmentation
ACTION_BUTTONS = ("segmentButton", "adoptButton", "editButton", "markSliceButton", "unmarkSliceButton", "markSlicesButton",
                  "improveButton", "statisticsButton", "exportStatisticsButton", "checkUpdatesButton",
                  "contributeButton", "installButton")


class DafneSlicerPanel:
    """Owns the panel's Qt objects; created by ``DafneSlicerWidget.setup``."""

    def __init__(self, ui, parameter_node_getter, observer, controller_factory):
        """``ui``: the .ui's child widgets by name; ``observer``: a VTKObservationMixin (the module widget);
        ``controller_factory(view) -> DafneController`` builds the controller around this view."""
        self.ui = ui
        self._parameter_node = parameter_node_getter
        self._observer = observer
        self._models: list[ModelChoice] = []
        self._observed_segmentation = None
        self.controller: DafneController = controller_factory(self)
        self.map_selection = lambda: None  # the Quantitative MRI section's picks (quantitative_panel.py) once it exists
        self.extra_action_buttons: list = []  # that section's buttons: idle only, like ACTION_BUTTONS

        self._poll_timer = qt.QTimer()
        self._poll_timer.setInterval(POLL_MS)
        self._poll_timer.timeout.connect(self._poll)
        self._edit_timer = qt.QTimer()
        self._edit_timer.setSingleShot(True)
        self._edit_timer.setInterval(EDIT_DEBOUNCE_MS)
        self._edit_timer.timeout.connect(self.controller.update_review)

        ui.progressBar.hide()
        ui.cancelButton.hide()
        ui.whatIsSentLabel.text = WHAT_IS_SENT
        ui.tokenWarningLabel.text = TOKEN_NOTE
        ui.diceTable.setHorizontalHeaderLabels(["Muscle", "Dice automatic", "Dice improved"])
        self._load_share_settings()
        self._connect()
        self.controller.refresh_models(self._parameter_node().modelName)
        self._update_dependency_label()

    # --- wiring -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        ui, c = self.ui, self.controller
        ui.installButton.clicked.connect(self._install)
        ui.segmentButton.clicked.connect(self._segment)
        ui.cancelButton.clicked.connect(c.cancel)
        ui.adoptButton.clicked.connect(self._adopt)
        ui.editButton.clicked.connect(c.open_editor)
        ui.markSliceButton.clicked.connect(lambda: c.mark_current_slice(True))
        ui.unmarkSliceButton.clicked.connect(lambda: c.mark_current_slice(False))
        ui.markSlicesButton.clicked.connect(lambda: c.mark_slices(ui.slicesLineEdit.text, True))
        ui.improveButton.clicked.connect(c.improve)
        ui.statisticsButton.clicked.connect(lambda: c.statistics(self.map_selection()))
        ui.exportStatisticsButton.clicked.connect(self._export_statistics)
        ui.modelComboBox.connect("currentIndexChanged(int)", self._model_changed)  # the int overload
        ui.shareCheckBox.toggled.connect(self._save_share_settings)
        ui.serverUrlLineEdit.editingFinished.connect(self._save_share_settings)
        ui.tokenLineEdit.editingFinished.connect(self._save_share_settings)
        ui.checkUpdatesButton.clicked.connect(c.check_for_updates)
        ui.contributeButton.clicked.connect(c.contribute)

    def _install(self) -> None:
        self.controller.install_dependencies()
        self._update_dependency_label()
        self._load_share_settings()

    def _segment(self) -> None:
        node = self._parameter_node()
        self.controller.segment(node.inputVolume, self.ui.modelComboBox.currentData, node.device, node.singleLegSide)

    def _adopt(self) -> None:
        node = self._parameter_node()
        self.controller.adopt(node.inputVolume, node.segmentation, self.ui.modelComboBox.currentData)
        self._follow_case()

    def _export_statistics(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export muscle statistics", "muscle_statistics.csv",
                                              "CSV files (*.csv)")
        if path:
            self.controller.export_statistics(path)

    def _model_changed(self, index: int) -> None:
        if 0 <= index < len(self._models):
            choice = self._models[index]
            if self._parameter_node() is not None:
                self._parameter_node().modelName = choice.name
            self.controller.model_chosen(choice.name)
            muscles = sorted({name.split(" ", 1)[1] for name in choice.label_names})
            self.ui.modelInfoLabel.text = (f"Version {choice.version} ({choice.source}), "
                                           f"{len(choice.label_names)} labels: {', '.join(muscles)} (right and left).")
        else:
            self.ui.modelInfoLabel.text = ""

    def _poll(self) -> None:
        if not self.controller.poll():
            self._poll_timer.stop()
            self._follow_case()
            if not self.ui.shareCheckBox.enabled:  # packages were installed on first use
                self._update_dependency_label()
                self._load_share_settings()

    def _follow_case(self) -> None:
        """Observe the current case's segmentation so edits update the review summary."""
        case = self.controller.case
        segmentation = case.segmentation_node if case is not None else None
        if segmentation is self._observed_segmentation:
            return
        if self._observed_segmentation is not None:
            for event in SEGMENTATION_EVENTS:
                self._observer.removeObserver(self._observed_segmentation, getattr(slicer.vtkSegmentation, event),
                                              self._segmentation_edited)
        self._observed_segmentation = segmentation
        if segmentation is not None and self._parameter_node() is not None:
            self._parameter_node().segmentation = segmentation
        if segmentation is not None:
            for event in SEGMENTATION_EVENTS:
                self._observer.addObserver(segmentation, getattr(slicer.vtkSegmentation, event),
                                           self._segmentation_edited)

    def _segmentation_edited(self, caller=None, event=None) -> None:
        self._edit_timer.start()  # restarts: only the last of a burst of paint strokes counts

    def _load_share_settings(self) -> None:
        # Reading the settings needs dafne_logic's model registry, hence torch: wait for the install.
        config = None if self.controller.install.missing() else self.controller.guarded(self.controller.sync.load)
        self.ui.shareCheckBox.enabled = config is not None
        if config is not None:
            self.ui.serverUrlLineEdit.text = config.server_url
            self.ui.tokenLineEdit.text = config.token
            # Setting the box emits toggled, which saves the fields: showing the settings must not rewrite them.
            was_blocked = self.ui.shareCheckBox.blockSignals(True)
            self.ui.shareCheckBox.checked = config.opt_in
            self.ui.shareCheckBox.blockSignals(was_blocked)
        self._enable_share_buttons(config is not None and config.opt_in)

    def _save_share_settings(self, *args) -> None:
        ui = self.ui
        self.controller.guarded(lambda: self.controller.sync.save(ui.shareCheckBox.checked, ui.serverUrlLineEdit.text,
                                                                   ui.tokenLineEdit.text))
        self._enable_share_buttons(ui.shareCheckBox.checked)

    def _enable_share_buttons(self, opted_in: bool) -> None:
        for name in ("serverUrlLineEdit", "tokenLineEdit", "checkUpdatesButton", "contributeButton"):
            getattr(self.ui, name).enabled = opted_in

    def _update_dependency_label(self) -> None:
        missing = self.controller.install.missing()
        self.ui.dependencyStatusLabel.text = ("All required Python packages are installed." if not missing else
                                              f"Not installed yet: {', '.join(missing)}.")
        self.ui.dependenciesCollapsibleButton.collapsed = not missing

    def cleanup(self) -> None:
        self._poll_timer.stop()
        self._edit_timer.stop()
        self.controller.shutdown()

    # --- View -------------------------------------------------------------------------------------

    def set_status(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 5000)

    def show_error(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle="DafneSlicer")

    def set_busy(self, task: str | None) -> None:
        for button in [getattr(self.ui, name) for name in ACTION_BUTTONS] + self.extra_action_buttons:
            button.enabled = task is None
        self.ui.modelComboBox.enabled = task is None  # the running job keeps its model; the list shows it
        self.ui.cancelButton.setVisible(task is not None)
        self.ui.progressBar.setVisible(task is not None)
        if task is not None:
            self._poll_timer.start()
        else:
            self._enable_share_buttons(self.ui.shareCheckBox.checked)

    def set_progress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} (%p%)")

    def set_models(self, choices: list[ModelChoice], selected: str | None) -> None:
        self._models = list(choices)
        combo = self.ui.modelComboBox
        was_blocked = combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            combo.addItem(choice.title, choice.name)
        names = [c.name for c in choices]
        combo.setCurrentIndex(names.index(selected) if selected in names else (0 if names else -1))
        combo.blockSignals(was_blocked)
        self._model_changed(combo.currentIndex)

    def set_review_summary(self, text: str) -> None:
        self.ui.reviewLabel.text = text

    def show_dice(self, rows: list[dict[str, object]]) -> None:
        table = self.ui.diceTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, key in enumerate(("muscle", "dice_automatic", "dice_improved")):
                value = row[key]
                table.setItem(r, c, qt.QTableWidgetItem(value if isinstance(value, str) else f"{value:.3f}"))
        table.resizeColumnsToContents()

    def set_sync_status(self, text: str) -> None:
        self.ui.syncStatusLabel.text = text
