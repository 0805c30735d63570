"""The widget's form: every control, laid out in four boxes, and the methods that only display things.

No model work and no viewer access here: :mod:`.widget` reads these controls,
runs jobs and calls the ``show_*`` methods with what came back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..adapters import ADAPTER_KINDS
from ..device import DEVICE_CHOICES
from ..objectives import DEFAULT_OBJECTIVE, INTENSITY_OBJECTIVE, OBJECTIVES
from .jobs import MetricsResult
from .plots import LinePlot

NO_GT = "(none)"
SPREAD, AROUND = "spread over the head", "around the current slice"


class Controls(QWidget):
    """Input, Segment, Adapt and Metrics boxes."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        column = QVBoxLayout(self)
        column.addWidget(self._input_box())
        column.addWidget(self._segment_box())
        column.addWidget(self._adapt_box())
        column.addWidget(self._metrics_box())
        column.addStretch(1)
        for combo in self.findChildren(QComboBox):  # long layer names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)

    def _input_box(self) -> QGroupBox:
        box = QGroupBox("Input")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.gt_combo = QComboBox()
        self.model_label = _label()
        self.model_button = QPushButton("Choose...")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        self.device_note = _label()
        form.addRow("MRI image", self.image_combo)
        form.addRow("ground truth", self.gt_combo)
        form.addRow("base model", _row(self.model_label, self.model_button))
        form.addRow("device", self.device_combo)
        form.addRow("", self.device_note)
        return box

    def _segment_box(self) -> QGroupBox:
        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.adapter_combo = QComboBox()
        self.refresh_button = QPushButton("Refresh")
        self.errors_check = QCheckBox("add a surface errors layer (needs ground truth)")
        self.tta_combo = QComboBox()  # test-time mirror views per slice: convlora segment --tta
        for views, text in ((1, "off"), (2, "2 mirror views (~1.3x time)"), (4, "4 mirror views (~2.8x time)")):
            self.tta_combo.addItem(text, views)
        self.tta_combo.setToolTip(
            "Average each slice's prediction over mirror images of it: more accurate boundaries, slower"
        )
        self.standardize_combo = QComboBox()  # convlora segment --standardize off|on|auto
        for value, text in (
            ("off", "off"),
            ("on", "on"),
            ("auto", "auto: keep one of four masks (slower)"),
        ):
            self.standardize_combo.addItem(text, value)
        self.standardize_combo.setToolTip(
            "Map this scan's intensity histogram onto the one the model was trained on before it reads it "
            "(no training). Helps on scanners with another contrast, loses on some scans; auto segments as it "
            "is, standardised, standardised on the brain too, and (with the model's scanner reference, no "
            "adapter) through an intensity curve learnt on 10 slices towards the training heads' features; it "
            "keeps the curve's mask if the model is no less sure of it than of the plain one and the brain "
            "step does not move the scan away from those features, else the brain-standardised mask where "
            "that input comes nearest the training heads' features and the model is no less sure of it, else "
            "the standardised one only if the model is surer of it (the confidence gate). With 'on', Adapt with a "
            "ConvLoRA objective adapts on standardised slices and its adapter standardises every scan it reads."
        )
        self.segment_button = QPushButton("Segment")
        self.status = _label("ready")
        self.segment_progress = _progress_bar()
        form.addRow("adapter", _row(self.adapter_combo, self.refresh_button))
        self.import_button = QPushButton("Import...")
        self.export_adapter_button = QPushButton("Export...")
        self.rename_button = QPushButton("Rename...")
        self.remove_button = QPushButton("Remove")
        form.addRow(
            "library", _row(self.import_button, self.export_adapter_button, self.rename_button, self.remove_button)
        )
        form.addRow("test-time flips", self.tta_combo)
        form.addRow("standardise intensities", self.standardize_combo)
        form.addRow(self.errors_check)
        form.addRow(self.segment_button)
        form.addRow(self.segment_progress)
        form.addRow(self.status)
        return box

    def _objective_changed(self, objective: str) -> None:
        """The intensity objective trains no adapter: the settings of trained adapters are greyed out."""
        trains = objective != INTENSITY_OBJECTIVE
        for control in (self.slices_spin, self.slice_mode, self.epochs_spin, self.lr_spin, self.kind_combo,
                        self.adabn_check):  # fmt: skip
            control.setEnabled(trains)

    def _adapt_box(self) -> QGroupBox:
        box = QGroupBox("Adapt to this scanner (no labels needed)")
        form = QFormLayout(box)
        self.slices_spin = _spin(1, 256, 10)
        self.slice_mode = QComboBox()
        self.slice_mode.addItems([SPREAD, AROUND])
        self.epochs_spin = _spin(1, 100, 5)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(1e-4)
        self.kind_combo = QComboBox()  # convlora (mergeable, the default) or moe (Conv-LoRA with scale experts)
        self.kind_combo.addItems(ADAPTER_KINDS)
        self.adabn_check = QCheckBox("AdaBN: batch-norm statistics from the scan")
        self.adabn_check.setToolTip("Re-estimate every batch-norm layer's statistics on the scan's slices (AdaBN)")
        self.adabn_check.setChecked(True)
        self.objective_combo = QComboBox()  # the label-free objective (napari_convlora.objectives)
        self.objective_combo.addItems(OBJECTIVES)
        self.objective_combo.setCurrentText(DEFAULT_OBJECTIVE)
        self.objective_combo.setToolTip(
            "intensity (default): no weights trained; the scan as it is, standardised, or through a learnt "
            "intensity curve, whichever the rule of 'standardise intensities: auto' keeps, saved as an intensity "
            "adapter for this scanner. The others train ConvLoRA adapters on the slices (early-head: the paper's)."
        )
        self.objective_combo.currentTextChanged.connect(self._objective_changed)
        self._objective_changed(DEFAULT_OBJECTIVE)
        self.keep_rejected_check = QCheckBox("keep the adapter even if the gate refuses it")
        self.keep_rejected_check.setToolTip(
            "Save the adapter even when the do-no-harm gate refuses it (its mask not surer than the source model's)"
        )
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("adapter name, e.g. philips-3t")
        self.adapt_button = QPushButton("Adapt")
        self.adapt_status = _label()
        self.adapt_progress = _progress_bar()
        self.train_plot = LinePlot("adaptation: loss per step, consistency per epoch", "step")
        self.slice_list = QListWidget()
        self.slice_list.setMaximumHeight(80)
        self.jump_button = QPushButton("Go to slice")
        form.addRow("slices", self.slices_spin)
        form.addRow("which slices", self.slice_mode)
        form.addRow("epochs", self.epochs_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow("adapter kind", self.kind_combo)
        form.addRow("", self.adabn_check)
        form.addRow("objective", self.objective_combo)
        form.addRow("", self.keep_rejected_check)
        form.addRow("name", self.name_edit)
        form.addRow(self.adapt_button)
        form.addRow(self.adapt_progress)
        form.addRow(self.adapt_status)
        form.addRow(self.train_plot)
        form.addRow("learned from", self.slice_list)
        form.addRow("", self.jump_button)
        return box

    def _metrics_box(self) -> QGroupBox:
        box = QGroupBox("Metrics against the ground truth")
        form = QFormLayout(box)
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.1, 20.0)
        self.tau_spin.setSingleStep(0.5)
        self.tau_spin.setValue(1.0)
        self.tau_spin.setSuffix(" mm")
        self.evaluate_button = QPushButton("Evaluate")
        self.table = QTableWidget(0, 0)
        self.table.setMinimumHeight(150)
        self.slice_plot = LinePlot("surface Dice per slice (axis 0)", "slice")
        self.export_button = QPushButton("Export CSV...")
        form.addRow("tolerance tau", self.tau_spin)
        form.addRow(self.evaluate_button)
        form.addRow(self.table)
        form.addRow(self.slice_plot)
        form.addRow(self.export_button)
        return box

    # ---------------------------------------------------------------- display
    def show_layers(self, images: Sequence[str], labels: Sequence[str], references: Sequence[str]) -> None:
        """Refill the layer choices; offer the last reference mask (not made by us) as ground truth."""
        _fill(self.image_combo, list(images))
        _fill(self.gt_combo, [NO_GT, *labels])
        if self.gt_combo.currentText() == NO_GT and references:
            self.gt_combo.setCurrentText(references[-1])

    def show_adapters(self, entries: Sequence[tuple[str, str]]) -> None:
        """Refill the adapter choices with (text, spec) pairs, keeping the current choice if it is still there."""
        current = self.adapter_combo.currentData()
        self.adapter_combo.clear()
        for text, spec in entries:
            self.adapter_combo.addItem(text, spec)
        self.adapter_combo.setCurrentIndex(max(self.adapter_combo.findData(current), 0))

    def select_adapter(self, spec: str) -> None:
        self.adapter_combo.setCurrentIndex(max(self.adapter_combo.findData(spec), 0))

    def show_running(self, segment_or_adapt: bool, adapting: bool) -> None:
        """Enable what can be clicked now; Adapt turns into Cancel while adapting."""
        self.segment_button.setEnabled(not segment_or_adapt)
        self.adapt_button.setEnabled(adapting or not segment_or_adapt)
        self.adapt_button.setText("Cancel" if adapting else "Adapt")

    def show_cancelling(self) -> None:
        self.adapt_button.setEnabled(False)
        self.adapt_button.setText("Cancelling...")

    def show_slices(self, slices: Sequence[tuple[int, int]]) -> None:
        self.slice_list.clear()
        for axis, index in slices:
            item = QListWidgetItem(f"slice {index} along axis {axis}")
            item.setData(Qt.ItemDataRole.UserRole, (axis, index))
            self.slice_list.addItem(item)

    def chosen_slice(self) -> tuple[int, int] | None:
        item = self.slice_list.currentItem()
        return None if item is None else tuple(item.data(Qt.ItemDataRole.UserRole))

    def show_metrics(self, result: MetricsResult, gt_name: str) -> None:
        """Fill the table (a column per mask, side by side, then the ground truth) and the per-slice plot."""
        rows = ("Dice", f"surface Dice @ {result.tolerance_mm:g} mm", "HD95 (mm)", "volume (ml)")
        keys = ("dice", "surface_dice", "hd95_mm", "volume_ml_pred")
        names = list(result.rows)
        self.table.clear()
        self.table.setRowCount(len(rows))
        self.table.setColumnCount(len(names) + 1)
        self.table.setVerticalHeaderLabels(rows)
        self.table.setHorizontalHeaderLabels([_short(n) for n in names] + [f"{_short(gt_name)} (truth)"])
        for col, name in enumerate(names):
            for row, key in enumerate(keys):
                self.table.setItem(row, col, QTableWidgetItem(_fmt(result.rows[name][key])))
        if names:
            self.table.setItem(3, len(names), QTableWidgetItem(_fmt(result.rows[names[0]]["volume_ml_gt"])))
        self.table.resizeColumnsToContents()
        self.slice_plot.clear()
        for name, scores in result.per_slice.items():
            self.slice_plot.set_series(_short(name), [(float(i), float(s)) for i, s in enumerate(scores)])


def _short(layer_name: str) -> str:
    """ "mask: philips-3t" -> "philips-3t": the table and plots have little room."""
    return layer_name.removeprefix("mask: ")


def _label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def _progress_bar() -> QProgressBar:
    """A determinate bar in the form, hidden when idle.

    Not napari's ``progress``: its activity indicator repaints the window while
    it is open, which cost the viewer's process 80% of a core on a software-GL
    display (measured), a core the model then lacks.
    """
    bar = QProgressBar()
    bar.setVisible(False)
    return bar


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for i, widget in enumerate(widgets):
        row.addWidget(widget, 1 if i == 0 else 0)
    return row


def _spin(low: int, high: int, value: int) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    return spin


def _fill(combo: QComboBox, items: list[str]) -> None:
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(items)
    if current in items:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"
