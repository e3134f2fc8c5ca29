"""The panel's *Quantitative MRI* section, built in code beside the .ui: map selectors (Dixon water and
fat, a fat-fraction map, one more parametric map), the edge erosion, whether NaN map voxels are left
out, and the cross-sectional-area and DICOM SEG export buttons. The *Statistics* button of the panel reads :meth:`QuantitativeSection.selection`.

Qt plumbing only; the actions are the controller's (``statistics(maps)``, ``cross_sectional_areas``,
``export_dicom_seg``), tested with fakes and with slicer-core.
"""

from __future__ import annotations

import ctk
import qt
import slicer

from .controller import DafneController, MapSelection

# The spin box's minimum stands for "the default erosion" (dafne_logic.core.quantitative.DEFAULT_ERODE_MM,
# not imported here: dafne_logic needs packages that are installed on first use, after the panel exists).
_DEFAULT_EROSION_VALUE = -0.5


class QuantitativeSection:
    def __init__(self, layout, controller: DafneController):
        """Add the section to the module panel's ``layout``."""
        self.controller = controller
        section = ctk.ctkCollapsibleButton()
        section.text = "Quantitative MRI"
        section.collapsed = True
        layout.addWidget(section)
        form = qt.QFormLayout(section)
        self.water = self._volume_selector(form, "Dixon water:", "Dixon water image; with the fat image, the "
                                           "statistics gain the fat fraction 100·F/(W+F) per muscle (percent).")
        self.fat = self._volume_selector(form, "Dixon fat:", "Dixon fat image of the same scan.")
        self.fat_fraction = self._volume_selector(form, "Fat-fraction map:", "A scanner-made fat-fraction map "
                                                  "(0–1 or 0–100, detected), instead of the Dixon pair.")
        self.map_name = qt.QLineEdit()
        self.map_name.placeholderText = "T2"
        self.map_name.toolTip = "Column name of the map: NAME_mean, NAME_median, NAME_sd."
        row = qt.QHBoxLayout()
        row.addWidget(self.map_name)
        self.map = self._volume_selector(None, "", "Any parametric map (T2, water T2, T1, ADC) of the same scan.")
        row.addWidget(self.map, 1)
        form.addRow("Other map:", row)
        self.erode = qt.QDoubleSpinBox()
        self.erode.minimum, self.erode.maximum, self.erode.singleStep = _DEFAULT_EROSION_VALUE, 10.0, 0.5
        self.erode.suffix = " mm"
        self.erode.specialValueText = "default"
        self.erode.value = _DEFAULT_EROSION_VALUE
        self.erode.toolTip = ("Leave out voxels this close to each muscle's outline (in-plane), so fascia and fat at the "
                              "edge do not bias the values. See Docs/quantitative.md.")
        form.addRow("Edge erosion:", self.erode)
        self.nan_as_missing = qt.QCheckBox("Leave out NaN voxels of the maps")
        self.nan_as_missing.toolTip = ("Fitting tools write NaN for failed fits and background: leave those voxels out of "
                                       "every summary. Unchecked, a map holding NaN or infinite values is refused. "
                                       "NIfTI files loaded into Slicer may already show NaN as 0: see Docs/quantitative.md.")
        form.addRow("", self.nan_as_missing)
        buttons = qt.QHBoxLayout()
        csa = qt.QPushButton("Cross-sectional areas")
        csa.toolTip = "Area of each muscle on every axial slice along the leg: a table and a plot."
        csa.clicked.connect(controller.cross_sectional_areas)
        dicom = qt.QPushButton("Export DICOM SEG...")
        dicom.toolTip = "Write the segmentation as a DICOM Segmentation of the volume's DICOM series."
        dicom.clicked.connect(self._export_dicom_seg)
        buttons.addWidget(csa)
        buttons.addWidget(dicom)
        self.action_buttons = [csa, dicom]  # disabled by the panel while a job runs, as its own buttons are
        form.addRow(buttons)

    @staticmethod
    def _volume_selector(form, label: str, tooltip: str):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.showChildNodeTypes = False  # not label maps
        selector.noneEnabled = True
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.toolTip = tooltip
        if form is not None:
            form.addRow(label, selector)
        return selector

    def selection(self) -> MapSelection:
        """The maps picked now (None for an empty selector) and the erosion (None: the default)."""
        name = self.map_name.text.strip() or "map"
        other = self.map.currentNode()
        erode = None if self.erode.value <= _DEFAULT_EROSION_VALUE else float(self.erode.value)
        return MapSelection(water=self.water.currentNode(), fat=self.fat.currentNode(),
                            fat_fraction=self.fat_fraction.currentNode(),
                            others=[(name, other)] if other is not None else [], erode_mm=erode,
                            nan_as_missing=bool(self.nan_as_missing.checked))

    def _export_dicom_seg(self) -> None:
        if not self.controller.can_export_dicom_seg():
            return
        path = qt.QFileDialog.getSaveFileName(None, "Export DICOM SEG", "segmentation.dcm", "DICOM files (*.dcm)")
        if path:
            self.controller.export_dicom_seg(path)
