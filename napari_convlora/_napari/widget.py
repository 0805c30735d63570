"""The "ConvLoRA Skull Strip" dock widget: segment, adapt to a new scanner, compare against a ground truth.

The widget only gathers choices, copies layer data, starts jobs (:mod:`.jobs`)
in napari thread workers and turns their reports into a progress bar, plots,
tables and new layers. It never writes into an existing layer: every result is
a new layer, added only when a job has finished, so a cancel or an error leaves
the viewer as it was.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..adapt import AdaptConfig, EpochReport, StepReport
from ..device import DEVICE_CHOICES, pick_device
from ..errors import InputError
from ..files import atomic_write, check_output_path
from ..inference import SegmentProgress
from ..library import ADAPTER_SUFFIX, BUILTIN_ADAPTERS, check_name, default_model_path, user_adapter_dir
from . import jobs
from .layers import MADE_BY_KEY, aligned_kwargs, check_image_volume, volume_from_layer
from .plots import LinePlot
from .workers import Job, start_job

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

NO_GT = "(none)"
SPREAD, AROUND = "spread over the head", "around the current slice"
METRIC_COLUMNS = ("Dice", "surface Dice", "HD95 (mm)", "volume (ml)")
CLOSE_WAIT_S = 30.0


class _CloseWatcher(QObject):
    """Stops running jobs when the window holding the widget closes (viewer closed during a run)."""

    def __init__(self, widget: ConvLoRAWidget) -> None:
        super().__init__(widget)
        self._widget = widget

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # Qt's method name
        if event.type() == QEvent.Type.Close:
            self._widget.stop_all(wait_s=CLOSE_WAIT_S)
        return False


class ConvLoRAWidget(QWidget):
    """Skull stripping with the source model or a ConvLoRA adapter, adaptation, and metrics."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model_path: Path | None = Path(model_path) if model_path is not None else None
        self.jobs: dict[str, Job] = {}
        self.timings: dict[str, float] = {}  # seconds from click to new layer, per job kind
        self.last_metrics: jobs.MetricsResult | None = None
        self.adapter_slices: list[tuple[int, int]] = []  # (file axis, index) the last adapter learned from
        self._progress: dict[str, progress] = {}
        self._clicked: dict[str, float] = {}
        self._closing = False
        self._pending_segment: tuple[str, float] | None = None
        self._segment_after_adapt = False
        self._watched = 0  # id of the window whose closing we watch (a reference would keep it alive)
        self._watcher = _CloseWatcher(self)
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.refresh_adapters()
        self._update_device_note()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        content = QWidget()
        column = QVBoxLayout(content)

        box = QGroupBox("Input")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.gt_combo = QComboBox()
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        model_button = QPushButton("Choose...")
        model_button.clicked.connect(self._choose_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_label, 1)
        model_row.addWidget(model_button)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        self.device_combo.currentTextChanged.connect(self._update_device_note)
        self.device_note = QLabel()
        self.device_note.setWordWrap(True)
        form.addRow("MRI image", self.image_combo)
        form.addRow("ground truth", self.gt_combo)
        form.addRow("base model", model_row)
        form.addRow("device", self.device_combo)
        form.addRow("", self.device_note)
        column.addWidget(box)

        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.adapter_combo = QComboBox()
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh_adapters)
        row = QHBoxLayout()
        row.addWidget(self.adapter_combo, 1)
        row.addWidget(refresh)
        self.errors_check = QCheckBox("add a surface errors layer (needs a ground truth)")
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        form.addRow("adapter", row)
        form.addRow(self.errors_check)
        form.addRow(self.segment_button)
        form.addRow(self.status)
        column.addWidget(box)

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
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("adapter name, e.g. philips-3t")
        self.adapt_button = QPushButton("Adapt")
        self.adapt_button.clicked.connect(self.adapt_or_cancel)
        self.adapt_status = QLabel("")
        self.adapt_status.setWordWrap(True)
        self.train_plot = LinePlot("adaptation: loss per step, agreement per epoch", "step")
        self.slice_list = QListWidget()
        self.slice_list.setMaximumHeight(90)
        self.slice_list.itemDoubleClicked.connect(self._jump_to_item)
        jump = QPushButton("Go to slice")
        jump.clicked.connect(lambda: self._jump_to_item(self.slice_list.currentItem()))
        form.addRow("slices", self.slices_spin)
        form.addRow("which slices", self.slice_mode)
        form.addRow("epochs", self.epochs_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow("name", self.name_edit)
        form.addRow(self.adapt_button)
        form.addRow(self.adapt_status)
        form.addRow(self.train_plot)
        form.addRow("learned from", self.slice_list)
        form.addRow("", jump)
        column.addWidget(box)

        box = QGroupBox("Metrics against the ground truth")
        form = QFormLayout(box)
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.1, 20.0)
        self.tau_spin.setSingleStep(0.5)
        self.tau_spin.setValue(1.0)
        self.tau_spin.setSuffix(" mm")
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.table = QTableWidget(0, len(METRIC_COLUMNS))
        self.table.setHorizontalHeaderLabels(METRIC_COLUMNS)
        self.table.setMinimumHeight(110)
        self.slice_plot = LinePlot("surface Dice per slice (axis 0)", "slice")
        export = QPushButton("Export CSV...")
        export.clicked.connect(self._choose_csv)
        form.addRow("tolerance tau", self.tau_spin)
        form.addRow(self.evaluate_button)
        form.addRow(self.table)
        form.addRow(self.slice_plot)
        form.addRow(export)
        column.addWidget(box)
        column.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(360)
        self._show_model()

    # ---------------------------------------------------------------- lists
    def _refresh_layers(self, event=None) -> None:
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        labels = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        _fill(self.image_combo, images)
        _fill(self.gt_combo, [NO_GT, *labels])
        if self.gt_combo.currentText() == NO_GT:  # offer a reference mask the user opened
            gts = [n for n in labels if not self._made_by_us(n)]
            if gts:
                self.gt_combo.setCurrentText(gts[-1])

    def _made_by_us(self, name: str) -> bool:
        return name in self.viewer.layers and MADE_BY_KEY in self.viewer.layers[name].metadata

    def refresh_adapters(self) -> None:
        """The adapter choices: source model, auto, the built-ins, then the user's library."""
        current = self.adapter_combo.currentData()
        self.adapter_combo.clear()
        self.adapter_combo.addItem(jobs.SOURCE_LABEL, jobs.SOURCE_LABEL)
        self.adapter_combo.addItem(jobs.AUTO_LABEL, jobs.AUTO_LABEL)
        for folder, tag in ((BUILTIN_ADAPTERS, " (built-in)"), (user_adapter_dir(), "")):
            if folder.is_dir():
                for path in sorted(folder.glob(f"*{ADAPTER_SUFFIX}")):
                    self.adapter_combo.addItem(path.name[: -len(ADAPTER_SUFFIX)] + tag, str(path))
        index = self.adapter_combo.findData(current)
        self.adapter_combo.setCurrentIndex(max(index, 0))

    def _update_device_note(self, *_: object) -> None:
        choice = self.device_combo.currentText()
        try:
            device = pick_device(choice)
        except InputError as exc:
            self.device_note.setText(str(exc))
            return
        if choice == "auto" and device.type == "cpu":
            self.device_note.setText("auto: no CUDA or MPS GPU found, running on the CPU (slower)")
        else:
            self.device_note.setText(f"running on {device.type}")

    def _show_model(self) -> None:
        if self.model_path is not None:
            self.model_label.setText(self.model_path.name)
            return
        try:
            self.model_label.setText(f"shipped source model ({default_model_path().name})")
        except InputError as exc:
            self.model_label.setText(str(exc))

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Base model weights", "", "safetensors (*.safetensors)")
        if path:
            self.model_path = Path(path)
            self._show_model()

    def _model(self) -> Path:
        return self.model_path if self.model_path is not None else default_model_path()

    # ---------------------------------------------------------------- inputs
    def _image_layer(self) -> Image:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no MRI image chosen: open a NIfTI volume (or File > Open Sample) first")
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image):
            raise InputError(f"layer {name!r} is a {type(layer).__name__} layer; an Image layer is needed")
        if layer.rgb or layer.multiscale:
            raise InputError(f"layer {name!r} is RGB or multiscale; a single grey-level 3D volume is needed")
        return layer

    def _gt_layer(self) -> Labels | None:
        name = self.gt_combo.currentText()
        if not name or name == NO_GT or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        if not isinstance(layer, Labels):
            raise InputError(f"layer {name!r} is a {type(layer).__name__} layer; the ground truth must be Labels")
        return layer

    def _busy(self) -> bool:
        return any(kind in self.jobs for kind in ("segment", "adapt"))

    def _set_busy(self) -> None:
        busy = self._busy()
        self.segment_button.setEnabled(not busy)
        running_adapt = "adapt" in self.jobs
        self.adapt_button.setEnabled(running_adapt or not busy)
        self.adapt_button.setText("Cancel" if running_adapt else "Adapt")

    # ---------------------------------------------------------------- segment
    def segment(self, spec: str | None = None) -> None:
        """Segment the chosen image with the chosen adapter (or ``spec``) into a new Labels layer."""
        if self._busy():
            show_warning("napari-convlora: a job is already running")
            return
        try:
            layer = self._image_layer()
            volume = check_image_volume(volume_from_layer(layer), layer.name)
            volume.data = np.array(volume.data)  # a copy: the user may edit the layer meanwhile
            spec = spec if isinstance(spec, str) else self.adapter_combo.currentData()
            model = self._model()
        except InputError as exc:
            self._notify_error(exc)
            return
        target = {"kwargs": aligned_kwargs(layer), "image": layer.name, "shape": volume.data.shape}
        device = self.device_combo.currentText()
        self._clicked["segment"] = time.perf_counter()
        self.status.setText(f"segmenting {layer.name}...")
        self.jobs["segment"] = start_job(
            "segment",
            jobs.segment_job,
            model,
            volume,
            spec,
            device,
            on_yield=lambda r: self._on_segment_progress(r),
            on_return=lambda r: self._on_segmented(r, target),
            on_error=lambda e: self._on_error("segment", e, device),
            on_finish=lambda: self._on_finished("segment"),
        )
        self._set_busy()

    def _on_segment_progress(self, report: SegmentProgress) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        bar = self._bar("segment", report.total, "ConvLoRA: segmenting")
        bar.update(report.done - bar.n)
        eta = report.elapsed_s / max(report.done, 1) * (report.total - report.done)
        self.status.setText(f"segmenting: {report.done}/{report.total} slices, about {eta:.0f} s left")

    def _on_segmented(self, result: jobs.SegmentResult | None, target: dict) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        after_adapt, self._segment_after_adapt = self._segment_after_adapt, False
        if result is None or self._closing:
            self.status.setText("segmentation stopped; nothing was added")
            return
        seg = result.segmentation
        kwargs = dict(target["kwargs"])
        kwargs["metadata"] = {
            **kwargs["metadata"],
            MADE_BY_KEY: {"image": target["image"], "adapter": result.label, "seconds": round(seg.seconds, 2)},
        }
        layer = self.viewer.add_labels(seg.mask, name=f"mask: {result.label}", opacity=0.45, **kwargs)
        elapsed = time.perf_counter() - self._clicked.pop("segment", time.perf_counter())
        self.timings["adapt" if after_adapt else "segment"] = elapsed
        self.status.setText(
            f"{layer.name}: {seg.volume_ml:.0f} ml, {elapsed:.1f} s from the {'Adapt' if after_adapt else 'Segment'} "
            f"click to mask; {result.note}"
        )
        if after_adapt:
            self.adapt_status.setText(
                self.adapt_status.text().replace("segmenting with it...", f"mask added ({layer.name})")
            )
        if result.label == "source" and "auto" in result.note:
            show_info(f"napari-convlora: {result.note}")
        if self._gt_layer() is not None:
            self.evaluate(errors_for=(layer.name,) if self.errors_check.isChecked() else ())
        elif self.errors_check.isChecked():
            show_warning("napari-convlora: no ground truth chosen, so no surface errors layer was made")

    # ---------------------------------------------------------------- adapt
    def adapt_or_cancel(self) -> None:
        """The Adapt button: start adapting, or cancel the running adaptation."""
        if "adapt" in self.jobs:
            self.jobs["adapt"].cancel()
            self.adapt_button.setEnabled(False)
            self.adapt_button.setText("Cancelling...")
            return
        self.adapt()

    def adapt(self) -> None:
        """Train an adapter on unlabeled slices of the chosen image; save it, select it, segment with it."""
        if self._busy():
            show_warning("napari-convlora: a job is already running")
            return
        try:
            layer = self._image_layer()
            volume = check_image_volume(volume_from_layer(layer), layer.name)
            volume.data = np.array(volume.data)
            name = self.name_edit.text().strip() or _default_name(layer.name)
            check_name(name)
            jobs.library_path(name)  # refuse a taken name now, not after training
            model = self._model()
        except InputError as exc:
            self._notify_error(exc)
            return
        around = None
        if self.slice_mode.currentText() == AROUND:
            world = self.viewer.dims.point[-3:]
            index = np.round(layer.world_to_data(world)).astype(int)
            around = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index, volume.data.shape, strict=True))
        config = AdaptConfig(
            slices=self.slices_spin.value(),
            epochs=self.epochs_spin.value(),
            lr=float(self.lr_spin.value()),
            device=self.device_combo.currentText(),
        )
        self.name_edit.setText(name)
        self.train_plot.clear()
        self._clicked["adapt"] = time.perf_counter()
        self.adapt_status.setText(f"adapting to {layer.name}: planning slices...")
        self.jobs["adapt"] = start_job(
            "adapt",
            jobs.adapt_job,
            model,
            volume,
            config,
            name,
            around=around,
            on_yield=self._on_adapt_progress,
            on_return=lambda r: self._on_adapted(r, layer.name),
            on_error=lambda e: self._on_error("adapt", e, config.device),
            on_finish=lambda: self._on_finished("adapt"),
        )
        self._set_busy()

    def _on_adapt_progress(self, report: object) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        if isinstance(report, StepReport):
            bar = self._bar("adapt", report.total_steps, "ConvLoRA: adapting")
            bar.update(report.step - bar.n)
            self.train_plot.add_point("loss", report.step, report.loss)
            self.adapt_status.setText(
                f"epoch {report.epoch}/{report.epochs}, step {report.step}/{report.total_steps}, "
                f"loss {report.loss:.3f}, about {report.eta_s:.0f} s left"
            )
        elif isinstance(report, EpochReport):
            steps = self._progress["adapt"].n if "adapt" in self._progress else report.epoch
            self.train_plot.add_point("agreement", steps, report.agreement)

    def _on_adapted(self, result: jobs.AdaptResult | None, image_name: str) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        if result is None or self._closing:
            self.adapt_status.setText("adaptation cancelled: nothing was saved or added")
            return
        done = result.done
        self.adapt_status.setText(
            f"saved {result.path.name} to the library ({done.adapter.trainable_parameters:,} trainable "
            f"parameters, best epoch {done.best_epoch}, {done.seconds:.1f} s); segmenting with it..."
        )
        self.refresh_adapters()
        self.adapter_combo.setCurrentIndex(max(self.adapter_combo.findData(str(result.path)), 0))
        self._mark_slices(result, image_name)
        # segment with the new adapter once the adapt worker has finished (see _on_finished)
        self._pending_segment = (str(result.path), self._clicked.pop("adapt", time.perf_counter()))

    def _mark_slices(self, result: jobs.AdaptResult, image_name: str) -> None:
        self.adapter_slices = [(result.axis, i) for i in result.file_slices]
        self.slice_list.clear()
        for axis, index in self.adapter_slices:
            item = QListWidgetItem(f"slice {index} along axis {axis}")
            item.setData(Qt.ItemDataRole.UserRole, (axis, index))
            self.slice_list.addItem(item)
        if image_name not in self.viewer.layers:
            return
        image = self.viewer.layers[image_name]
        shape = image.data.shape
        centre = [(n - 1) / 2 for n in shape]
        points = []
        for axis, index in self.adapter_slices:
            point = list(centre)
            point[axis] = index
            points.append(point)
        kwargs = aligned_kwargs(image)
        kwargs["metadata"] = {**kwargs["metadata"], MADE_BY_KEY: {"adapter_slices": result.done.adapter.name}}
        self.viewer.add_points(
            np.asarray(points, dtype=float),
            name=f"adapter slices: {result.done.adapter.name}",
            size=max(shape) / 12,
            face_color="yellow",
            **kwargs,
        )

    def _jump_to_item(self, item: QListWidgetItem | None) -> None:
        if item is None:
            return
        axis, index = item.data(Qt.ItemDataRole.UserRole)
        self.jump_to_slice(axis, index)

    def jump_to_slice(self, axis: int, index: int) -> None:
        """Show slice ``index`` of file axis ``axis`` of the chosen image (2D view along that axis)."""
        try:
            layer = self._image_layer()
        except InputError as exc:
            self._notify_error(exc)
            return
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        order = [a for a in dims.order if a != offset + axis]
        dims.order = (offset + axis, *order)
        position = [(n - 1) / 2 for n in layer.data.shape]
        position[axis] = index
        dims.set_point(offset + axis, float(layer.data_to_world(position)[axis]))

    # ---------------------------------------------------------------- metrics
    def evaluate(self, errors_for: tuple[str, ...] = ()) -> None:
        """Score every mask this widget made for the ground truth's grid against it."""
        errors_for = errors_for if isinstance(errors_for, tuple) else ()
        if "metrics" in self.jobs:
            show_warning("napari-convlora: metrics are already being computed")
            return
        try:
            gt = self._gt_layer()
            if gt is None:
                raise InputError("no ground truth chosen: pick a Labels layer (e.g. the sample's consensus mask)")
            gt_data = np.array(gt.data)
            if gt_data.ndim != 3:
                raise InputError(f"layer {gt.name!r}: the ground truth must be 3D, it is {gt_data.ndim}D")
            masks = {
                layer.name: np.array(layer.data)
                for layer in self.viewer.layers
                if isinstance(layer, Labels) and MADE_BY_KEY in layer.metadata and layer.data.shape == gt_data.shape
            }
            if not masks:
                raise InputError(f"no mask on the grid of {gt.name!r} yet: click Segment first")
            spacing = tuple(float(s) for s in volume_from_layer(gt).spacing)
        except InputError as exc:
            self._notify_error(exc)
            return
        tau = float(self.tau_spin.value())
        kwargs = aligned_kwargs(gt)
        self.evaluate_button.setEnabled(False)
        self.jobs["metrics"] = start_job(
            "metrics",
            jobs.metrics_job,
            masks,
            gt_data,
            spacing,
            tau,
            errors_for,
            on_return=lambda r: self._on_metrics(r, gt.name, kwargs),
            on_error=lambda e: self._on_error("metrics", e),
            on_finish=lambda: self._on_finished("metrics"),
        )

    def _on_metrics(self, result: jobs.MetricsResult | None, gt_name: str, kwargs: dict) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        if result is None or self._closing:
            return
        self.last_metrics = result
        self.table.setHorizontalHeaderLabels(
            ["Dice", f"surface Dice @ {result.tolerance_mm:g} mm", "HD95 (mm)", "volume (ml)"]
        )
        names = [*result.rows, gt_name]
        self.table.setRowCount(len(names))
        self.table.setVerticalHeaderLabels(names)
        for row, name in enumerate(result.rows):
            figures = result.rows[name]
            values = (figures["dice"], figures["surface_dice"], figures["hd95_mm"], figures["volume_ml_pred"])
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(_fmt(value)))
        if result.rows:
            gt_volume = next(iter(result.rows.values()))["volume_ml_gt"]
            self.table.setItem(len(names) - 1, 3, QTableWidgetItem(_fmt(gt_volume)))
        self.table.resizeColumnsToContents()
        self.slice_plot.clear()
        for name, scores in result.per_slice.items():
            self.slice_plot.set_series(name, [(float(i), float(s)) for i, s in enumerate(scores)])
        for name, error_map in result.errors.items():
            meta = {**kwargs["metadata"], MADE_BY_KEY: {"surface_errors_of": name, "tolerance_mm": result.tolerance_mm}}
            self.viewer.add_labels(
                error_map,
                name=f"surface errors: {name}",
                **{**kwargs, "metadata": meta},
            )

    def metrics_csv(self) -> str:
        """The metrics table as CSV text (one row per mask)."""
        if self.last_metrics is None:
            raise InputError("no metrics yet: choose a ground truth and click Evaluate")
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["mask", "dice", "surface_dice", "tolerance_mm", "hd95_mm", "volume_ml", "volume_ml_gt"])
        for name, f in self.last_metrics.rows.items():
            writer.writerow(
                [
                    name,
                    f["dice"],
                    f["surface_dice"],
                    f["tolerance_mm"],
                    f["hd95_mm"],
                    f["volume_ml_pred"],
                    f["volume_ml_gt"],
                ]
            )
        return out.getvalue()

    def export_csv(self, path: str | Path) -> Path | None:
        """Write the metrics table to ``path`` (atomically; replaces the file, as the save dialog confirmed)."""
        try:
            text = self.metrics_csv()
            path = check_output_path(path, overwrite=True, suffixes=(".csv",))
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True)
        except InputError as exc:
            self._notify_error(exc)
            return None
        show_info(f"napari-convlora: metrics written to {path}")
        return path

    def _choose_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", "convlora_metrics.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path if path.lower().endswith(".csv") else f"{path}.csv")

    # ---------------------------------------------------------------- job plumbing
    def _bar(self, kind: str, total: int, description: str) -> progress:
        if kind not in self._progress:
            self._progress[kind] = progress(total=total, desc=description)
        return self._progress[kind]

    def _on_error(self, kind: str, exc: BaseException, device: str = "") -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        if not isinstance(exc, InputError):
            log.error("napari-convlora %s failed", kind, exc_info=exc)
        message = jobs.describe_error(exc, device)
        (self.adapt_status if kind == "adapt" else self.status).setText(f"failed: {message}")
        show_error(f"napari-convlora: {message}")

    def _on_finished(self, kind: str) -> None:
        self.jobs.pop(kind, None)
        if self._closing:
            return
        bar = self._progress.pop(kind, None)
        if bar is not None:
            bar.close()
        if kind == "metrics":
            self.evaluate_button.setEnabled(True)
        self._set_busy()
        if kind == "adapt" and self._pending_segment is not None and not self._closing:
            spec, clicked = self._pending_segment
            self._pending_segment = None
            self.segment(spec)
            if "segment" in self.jobs:  # click-to-mask of Adapt counts from the Adapt click
                self._clicked["segment"] = clicked
                self._segment_after_adapt = True

    def _notify_error(self, exc: BaseException) -> None:
        show_error(f"napari-convlora: {jobs.describe_error(exc)}")

    def stop_all(self, wait_s: float = 0.0) -> None:
        """Ask every running job to stop; with ``wait_s`` (the viewer is closing) wait for them and let go."""
        for job in list(self.jobs.values()):
            job.cancel()
        if wait_s <= 0:
            return
        self._closing = True
        for job in list(self.jobs.values()):
            if not job.wait(wait_s):
                log.warning("napari-convlora: a %s job did not stop within %.0f s", job.kind, wait_s)
        for bar in self._progress.values():
            bar.close()
        self._progress.clear()

    def showEvent(self, event) -> None:  # Qt's method name
        window = self.window()
        if window is not self and id(window) != self._watched:
            window.installEventFilter(self._watcher)
            self._watched = id(window)
        super().showEvent(event)


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


def _default_name(layer_name: str) -> str:
    """A valid adapter name from a layer name (letters, digits, '.', '_', '-')."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in layer_name).strip("-.") or "adapter"
    return cleaned[:64]


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"
