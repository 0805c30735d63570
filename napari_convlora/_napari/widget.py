"""The "ConvLoRA Skull Strip" dock widget: segment, adapt to a new scanner, compare against a ground truth.

The widget gathers the choices made in :class:`.controls.Controls`, copies the
layer data, runs jobs (:mod:`.jobs`) in its worker process (:mod:`.job_process`,
relayed by napari thread workers; in the threads themselves if the process
cannot start) and turns their reports into a progress bar, plots, a table and
layers. It never writes into a layer the user made or changed: a result goes
into a new layer, or refreshes this widget's own layer of the same name if that
still holds exactly what the widget put there (cheaper for napari than a new
one). Results land only when their job has finished, so a cancel or an error
leaves the viewer as it was.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QInputDialog, QMessageBox, QScrollArea, QVBoxLayout, QWidget

from .. import library
from ..adapt import AdaptConfig, EpochReport, GateProgress, StepReport
from ..adapters import load_adapter
from ..device import pick_device
from ..errors import InputError
from ..files import atomic_write, check_output_path
from ..inference import SegmentProgress
from ..intensity_curve import CurveStep
from ..library import ADAPTER_SUFFIX, BUILTIN_ADAPTERS, check_name, default_model_path
from ..objectives import INTENSITY_OBJECTIVE
from ..review import upright_view
from . import jobs
from .batch_panel import BatchPanel
from .controls import AROUND, NO_GT, Controls
from .job_process import JobProcess
from .layers import MADE_BY_KEY, aligned_kwargs, check_image_volume, volume_from_layer
from .workers import Job, start_job

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

# napari's Labels layer imports pandas the first time one is made: ~0.4 s on the GUI thread just when the
# first mask arrives (measured, scripts/bench_gui.py). Importing it with the widget moves that to opening time.
importlib.import_module("pandas")

CLOSE_WAIT_S = 30.0  # how long closing the viewer waits for a job to stop (it stops within one step)
WORKER_ENV = "CONVLORA_WORKER"  # "process" (the default) or "thread"


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

    def __init__(
        self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None, worker: str | None = None
    ) -> None:
        """``worker``: "process" (default; ``CONVLORA_WORKER`` may say "thread") runs the model out of this process."""
        super().__init__()
        worker = worker or os.environ.get(WORKER_ENV, "process")
        if worker not in ("process", "thread"):
            raise ValueError(f"worker must be 'process' or 'thread', got {worker!r}")
        self.process: JobProcess | None = JobProcess() if worker == "process" else None
        if self.process is not None:
            self.process.start()  # torch loads there while the user opens a scan
        self._told_fallback = False
        self._warmed = False
        # what this widget last put in each of its Labels layers (by napari's unique_id: plugins get proxies of
        # layers, so the objects themselves cannot be keys): a layer still holding it is refreshed in place
        self._written: dict[object, tuple[str, np.ndarray]] = {}
        self.viewer = napari_viewer
        self.model_path: Path | None = Path(model_path) if model_path is not None else None
        self.jobs: dict[str, Job] = {}
        # seconds from click to new mask layer: "segment", "adapt" (to the gate's refusal, if it refused)
        self.timings: dict[str, float] = {}
        self.last_metrics: jobs.MetricsResult | None = None
        self.adapter_slices: list[tuple[int, int]] = []  # (file axis, index) the last adapter learned from
        self._clicked: dict[str, float] = {}
        self._pending_segment: tuple[str, float] | None = None  # after Adapt: (adapter file, click time)
        self._segment_after_adapt = False
        self._adapt_objective = ""  # the objective of the Adapt that runs (its progress reads differently)
        self._closing = False
        self._watched = 0  # id of the window whose closing we watch (a reference would keep it alive)
        self._watcher = _CloseWatcher(self)

        self.controls = c = Controls()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(c)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.batch = BatchPanel(self._batch_options)
        c.layout().insertWidget(c.layout().count() - 1, self.batch)  # above the stretch
        # as wide as the boxes need beside the vertical scroll bar: the dock must not cut off their right edge
        bar = scroll.verticalScrollBar().sizeHint().width()
        self.setMinimumWidth(max(380, c.minimumSizeHint().width() + bar + 2 * scroll.frameWidth()))

        c.model_button.clicked.connect(self._choose_model)
        c.device_combo.currentTextChanged.connect(self._show_device)
        c.refresh_button.clicked.connect(self.refresh_adapters)
        c.import_button.clicked.connect(self._import_dialog)
        c.export_adapter_button.clicked.connect(self._export_dialog)
        c.rename_button.clicked.connect(self._rename_dialog)
        c.remove_button.clicked.connect(self._remove_dialog)
        c.segment_button.clicked.connect(lambda: self.segment())
        c.adapt_button.clicked.connect(self.adapt_or_cancel)
        c.slice_list.itemDoubleClicked.connect(lambda _item: self._jump_to_chosen())
        c.jump_button.clicked.connect(self._jump_to_chosen)
        c.evaluate_button.clicked.connect(lambda: self.evaluate())
        c.export_button.clicked.connect(self._choose_csv)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.refresh_adapters()
        self._show_device()
        self._show_model()

    # ---------------------------------------------------------------- choices
    def _refresh_layers(self, event=None) -> None:
        layers = list(self.viewer.layers)
        present = {layer.unique_id for layer in layers}
        for gone in [key for key in self._written if key not in present]:  # removed layers: forget their copies
            del self._written[gone]
        labels = [layer.name for layer in layers if isinstance(layer, Labels)]
        self.controls.show_layers(
            [layer.name for layer in layers if isinstance(layer, Image)],
            labels,
            [layer.name for layer in layers if isinstance(layer, Labels) and MADE_BY_KEY not in layer.metadata],
        )

    def refresh_adapters(self) -> None:
        """The adapter choices: source model, auto, the built-ins, then the user's library."""
        entries = [(jobs.SOURCE_LABEL, jobs.SOURCE_LABEL), (jobs.AUTO_LABEL, jobs.AUTO_LABEL)]
        entries += [(f"{n} (built-in)" if builtin else n, str(p)) for n, p, builtin in jobs.library_files()]
        self.controls.show_adapters(entries)

    # ---------------------------------------------------------------- adapter library
    def _library_choice(self, user_only: bool) -> str | None:
        """The chosen adapter's library name; None, with a notification, for source/auto (or built-in if user_only)."""
        path = Path(self.controls.adapter_combo.currentData() or "")
        name = path.name.removesuffix(ADAPTER_SUFFIX)
        if path.suffix != ADAPTER_SUFFIX:
            self._notify_error(InputError("choose an adapter of the library in the list first"))
        elif user_only and path.parent == BUILTIN_ADAPTERS:
            self._notify_error(InputError(f"{name!r} is a built-in adapter; built-ins cannot be renamed or removed"))
        else:
            return name
        return None

    def _library_action(self, action, *args) -> object | None:
        """Run a library function; errors become notifications, success refreshes the list."""
        try:
            result = action(*args)
        except InputError as exc:
            self._notify_error(exc)
            return None
        self.refresh_adapters()
        return result

    def import_adapter(self, file: str | Path) -> Path | None:
        """Check ``file`` and copy it into the user library; a name already taken asks for another one."""
        try:
            name = load_adapter(file).name
        except InputError as exc:
            self._notify_error(exc)
            return None
        usable = library.NAME_PATTERN.match(name) and not name.endswith(ADAPTER_SUFFIX)
        if not usable or library.named_adapter_path(name) is not None:
            name, ok = QInputDialog.getText(
                self, "Import adapter", f"The name {name!r} is taken or not usable; library name:", text=f"{name}-2"
            )
            if not ok or not name:
                return None
        info = self._library_action(library.import_adapter, file, name)
        if info is None:
            return None
        self.controls.select_adapter(str(info.path))
        show_info(f"napari-convlora: imported {file} as {info.name!r}")
        return info.path

    def export_adapter(self, file: str | Path) -> Path | None:
        """Write the chosen adapter to ``file`` (replacing it: the save dialog asked)."""
        name = self._library_choice(user_only=False)
        if name is None:
            return None
        path = self._library_action(library.export_adapter, name, file, True)
        if path is not None:
            show_info(f"napari-convlora: adapter {name!r} exported to {path}")
        return path

    def rename_adapter(self, new_name: str) -> Path | None:
        name = self._library_choice(user_only=True)
        if name is None:
            return None
        path = self._library_action(library.rename_adapter, name, new_name)
        if path is not None:
            self.controls.select_adapter(str(path))
        return path

    def remove_adapter(self) -> Path | None:
        name = self._library_choice(user_only=True)
        return None if name is None else self._library_action(library.remove_adapter, name)

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import adapter", "", "adapters (*.safetensors)")
        if path:
            self.import_adapter(path)

    def _export_dialog(self) -> None:
        name = Path(self.controls.adapter_combo.currentData() or "").name
        path, _ = QFileDialog.getSaveFileName(self, "Export adapter", name, "adapters (*.safetensors)")
        if path:
            self.export_adapter(path if path.endswith(ADAPTER_SUFFIX) else f"{path}{ADAPTER_SUFFIX}")

    def _rename_dialog(self) -> None:
        name = self._library_choice(user_only=True)
        if name is None:
            return
        new_name, ok = QInputDialog.getText(self, "Rename adapter", f"New library name for {name!r}:", text=name)
        if ok and new_name and new_name != name:
            self.rename_adapter(new_name)

    def _remove_dialog(self) -> None:
        name = self._library_choice(user_only=True)
        if name is None:
            return
        answer = QMessageBox.question(self, "Remove adapter", f"Delete the adapter {name!r} from your library?")
        if answer == QMessageBox.StandardButton.Yes:
            self.remove_adapter()

    def _show_device(self, *_: object) -> None:
        choice = self.controls.device_combo.currentText()
        try:
            device = pick_device(choice)
        except InputError as exc:
            self.controls.device_note.setText(str(exc))
            return
        if choice == "auto" and device.type == "cpu":
            self.controls.device_note.setText("auto: no CUDA or MPS GPU found, running on the CPU (slower)")
        else:
            self.controls.device_note.setText(f"running on {device.type}")

    def _show_model(self) -> None:
        label = self.controls.model_label
        try:
            path = self._model()
        except InputError as exc:
            label.setText(str(exc))
            return
        label.setText(path.name if self.model_path is not None else "shipped source model")
        label.setToolTip(str(path))

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Base model weights", "", "safetensors (*.safetensors)")
        if path:
            self.model_path = Path(path)
            self._show_model()

    def _batch_options(self) -> tuple[str, str, Path | None, int, str]:
        """What ``convlora batch`` gets from this widget: --adapter (the adapter choice), --device, --model, --tta,
        --standardize."""
        c = self.controls
        spec = c.adapter_combo.currentData() or jobs.SOURCE_LABEL
        adapter = {jobs.SOURCE_LABEL: "none", jobs.AUTO_LABEL: "auto"}.get(spec, spec)
        options = (c.device_combo.currentText(), self.model_path, c.tta_combo.currentData())
        return adapter, *options, c.standardize_combo.currentData()

    def _model(self) -> Path:
        return self.model_path if self.model_path is not None else default_model_path()

    def _image_layer(self) -> Image:
        name = self.controls.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no MRI image chosen: open a NIfTI volume (or File > Open Sample) first")
        layer = self.viewer.layers[name]
        if not isinstance(layer, Image):
            raise InputError(f"layer {name!r} is a {type(layer).__name__} layer; an Image layer is needed")
        if layer.rgb or layer.multiscale:
            raise InputError(f"layer {name!r} is RGB or multiscale; a single grey-level 3D volume is needed")
        return layer

    def _image_volume(self, layer: Image):
        volume = check_image_volume(volume_from_layer(layer), layer.name)
        volume.data = np.array(volume.data)  # a copy: the user may edit the layer while the job runs
        return volume

    def _gt_layer(self) -> Labels | None:
        name = self.controls.gt_combo.currentText()
        if not name or name == NO_GT or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        if not isinstance(layer, Labels):
            raise InputError(f"layer {name!r} is a {type(layer).__name__} layer; the ground truth must be Labels")
        return layer

    def _busy(self) -> bool:
        if "segment" in self.jobs or "adapt" in self.jobs:
            show_warning("napari-convlora: a job is already running")
            return True
        return False

    def _show_running(self) -> None:
        self.controls.show_running("segment" in self.jobs or "adapt" in self.jobs, "adapt" in self.jobs)

    # ---------------------------------------------------------------- segment
    def segment(self, spec: str | None = None) -> None:
        """Segment the chosen image with the chosen adapter (or ``spec``) into a new Labels layer."""
        if self._busy():
            return
        c = self.controls
        try:
            layer = self._image_layer()
            volume = self._image_volume(layer)
            model = self._model()
        except InputError as exc:
            self._notify_error(exc)
            return
        spec = spec or c.adapter_combo.currentData()
        target = {"kwargs": aligned_kwargs(layer), "image": layer.name}
        device = c.device_combo.currentText()
        if not self._segment_after_adapt:  # after Adapt, click-to-mask counts from the Adapt click
            self._clicked["segment"] = time.perf_counter()
        c.status.setText(f"segmenting {layer.name}...")
        self.jobs["segment"] = self._start(
            "segment",
            jobs.segment_job,
            model,
            volume,
            spec,
            device,
            tta=c.tta_combo.currentData(),
            standardize=c.standardize_combo.currentData(),
            on_yield=self._on_segment_progress,
            on_return=lambda r: self._on_segmented(r, target),
            on_error=lambda e: self._on_error("segment", e, device),
            on_finish=lambda: self._on_finished("segment"),
        )
        self._show_running()

    def _on_segment_progress(self, report: SegmentProgress | CurveStep) -> None:
        if self._closing:  # the viewer is closing: its widgets may be gone
            return
        done, total, what = (
            (report.step, report.steps, "learning the intensity curve: step")
            if isinstance(report, CurveStep)
            else (report.done, report.total, "segmenting:")
        )
        self._show_progress(self.controls.segment_progress, done, total)
        eta = report.elapsed_s / max(done, 1) * (total - done)
        unit = "" if isinstance(report, CurveStep) else " slices"
        self.controls.status.setText(f"{what} {done}/{total}{unit}, about {eta:.0f} s left")

    def _on_segmented(self, result: jobs.SegmentResult | None, target: dict) -> None:
        if self._closing:
            return
        after_adapt, self._segment_after_adapt = self._segment_after_adapt, False
        if result is None:
            self.controls.status.setText("segmentation stopped; nothing was added")
            return
        self._add_mask(result, target, after_adapt)

    def _add_mask(self, result: jobs.SegmentResult, target: dict, after_adapt: bool) -> None:
        """The mask as a Labels layer on the image's grid (:meth:`_put_labels`); then metrics, with a ground truth."""
        c = self.controls
        seg = result.segmentation
        kwargs = dict(target["kwargs"])
        made = {"image": target["image"], "adapter": result.label, "seconds": round(seg.seconds, 2)}
        kwargs["metadata"] = {**kwargs["metadata"], MADE_BY_KEY: made}
        layer = self._put_labels(seg.mask, f"mask: {result.label}", target["image"], opacity=0.45, **kwargs)
        elapsed = time.perf_counter() - self._clicked.pop("adapt" if after_adapt else "segment", time.perf_counter())
        self.timings["adapt" if after_adapt else "segment"] = elapsed
        clicked = "Adapt" if after_adapt else "Segment"  # click-to-mask of Adapt counts from the Adapt click
        c.status.setText(f"{layer.name}: {seg.volume_ml:.0f} ml, {elapsed:.1f} s from {clicked} click; {result.note}")
        if after_adapt:
            c.adapt_status.setText(c.adapt_status.text().replace("segmenting with it...", f"added {layer.name}"))
        if result.note.startswith("auto"):
            show_info(f"napari-convlora: {result.note}")
        if self._gt_layer() is not None:
            self.evaluate(errors_for=(layer.name,) if c.errors_check.isChecked() else ())
        elif c.errors_check.isChecked():
            show_warning("napari-convlora: no ground truth chosen, so no surface errors layer was made")

    def _put_labels(self, data: np.ndarray, name: str, image: str, **kwargs) -> Labels:
        """A Labels layer ``name`` showing ``data``: a new one, or this widget's own layer of that name, refreshed.

        Refreshing costs napari ~10 ms where a new layer costs ~100 ms plus its first
        paint (measured, scripts/bench_gui.py). Only a layer this widget made for the
        same image, on the same grid, and still holding exactly what the widget put in
        it is refreshed: a layer the user painted on or renamed is never written into.
        """
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        written = self._written.get(layer.unique_id) if isinstance(layer, Labels) else None
        if (
            written is not None
            and written[0] == image
            and layer.data.shape == data.shape
            and all(np.allclose(getattr(layer, key), kwargs[key]) for key in ("scale", "translate") if key in kwargs)
            and np.array_equal(layer.data, written[1])
        ):
            layer.metadata = kwargs.get("metadata", layer.metadata)
            layer.data = data
        else:
            layer = self._add_unselected(data, name=name, **kwargs)
        self._written[layer.unique_id] = (image, np.array(data, copy=True))
        return layer

    def _add_unselected(self, data: np.ndarray, **kwargs) -> Labels:
        """``viewer.add_labels`` without making the new layer the selected one; the user's selection stays.

        napari selects a new layer, and then builds, lays out and paints its
        controls panel on the GUI thread at once: about 15 ms of the ~110 ms an
        add freezes the viewer (median worst stall 110 ms selected, 94 ms not;
        ``scripts/bench_layer_add.py``). The switch is napari's private
        ``_activate_on_insert``; on a napari without it the layer is added as usual.
        """
        layers = self.viewer.layers
        if not isinstance(getattr(layers, "_activate_on_insert", None), bool):
            return self.viewer.add_labels(data, **kwargs)
        layers._activate_on_insert = False
        try:
            return self.viewer.add_labels(data, **kwargs)
        finally:
            layers._activate_on_insert = True

    # ---------------------------------------------------------------- adapt
    def adapt_or_cancel(self) -> None:
        """The Adapt button: start adapting, or cancel the running adaptation."""
        if "adapt" in self.jobs:
            self.jobs["adapt"].cancel()
            self.controls.show_cancelling()
            return
        self.adapt()

    def adapt(self) -> None:
        """Train an adapter on unlabeled slices of the chosen image; save it, select it, segment with it."""
        if self._busy():
            return
        c = self.controls
        try:
            layer = self._image_layer()
            volume = self._image_volume(layer)
            name = c.name_edit.text().strip() or _default_name(layer.name)
            check_name(name)
            jobs.library_path(name)  # refuse a taken name now, not after training
            model = self._model()
        except InputError as exc:
            self._notify_error(exc)
            return
        around = None
        if c.slice_mode.currentText() == AROUND:
            index = np.round(layer.world_to_data(self.viewer.dims.point[-layer.ndim :])).astype(int)
            around = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index, volume.data.shape, strict=True))
        objective = self._adapt_objective = c.objective_combo.currentText()
        config = AdaptConfig(
            slices=c.slices_spin.value(),
            epochs=c.epochs_spin.value(),
            lr=float(c.lr_spin.value()),
            device=c.device_combo.currentText(),
            kind=c.kind_combo.currentText(),
            adabn=c.adabn_check.isChecked(),
            objective=objective,
            # the intensity objective chooses the standardisation itself
            standardize=objective != INTENSITY_OBJECTIVE and c.standardize_combo.currentData() == "on",
        )
        target = {"kwargs": aligned_kwargs(layer), "image": layer.name}
        c.name_edit.setText(name)
        c.train_plot.title = (
            "intensity curve: distance from the training heads per step"
            if objective == INTENSITY_OBJECTIVE
            else "adaptation: loss per step, consistency per epoch"
        )
        c.train_plot.clear()
        self._clicked["adapt"] = time.perf_counter()
        c.adapt_status.setText(f"adapting to {layer.name}: choosing slices...")
        self.jobs["adapt"] = self._start(
            "adapt",
            jobs.adapt_job,
            model,
            volume,
            config,
            name,
            around=around,
            keep_rejected=c.keep_rejected_check.isChecked(),
            on_yield=self._on_adapt_progress,
            on_return=lambda r: self._on_adapted(r, target),
            on_error=lambda e: self._on_error("adapt", e, config.device),
            on_finish=lambda: self._on_finished("adapt"),
        )
        self._show_running()

    def _on_adapt_progress(self, report: object) -> None:
        if self._closing:
            return
        c = self.controls
        if isinstance(report, StepReport):
            self._show_progress(c.adapt_progress, report.step, report.total_steps)
            c.train_plot.add_point("loss", report.step, report.loss)
            c.adapt_status.setText(
                f"epoch {report.epoch}/{report.epochs}, step {report.step}/{report.total_steps}, "
                f"loss {report.loss:.3f}, about {report.eta_s:.0f} s left"
            )
        elif isinstance(report, CurveStep):  # the intensity objective learns its curve
            self._show_progress(c.adapt_progress, report.step, report.steps)
            c.train_plot.add_point("distance", report.step, report.distance)
            eta = report.elapsed_s / report.step * (report.steps - report.step)
            c.adapt_status.setText(
                f"learning the intensity curve: step {report.step}/{report.steps}, about {eta:.0f} s left"
            )
        elif isinstance(report, EpochReport):
            c.train_plot.add_point("consistency", c.adapt_progress.value(), report.score)
        elif isinstance(report, GateProgress):
            self._show_progress(c.adapt_progress, report.done, report.total)
            what = (
                "as it is, standardised and through the curve, to keep one"
                if self._adapt_objective == INTENSITY_OBJECTIVE
                else "with the source and the adapted model"
            )
            c.adapt_status.setText(
                f"do-no-harm check: segmenting the whole scan {what}, {report.done}/{report.total} slices"
            )

    def _on_adapted(self, result: jobs.AdaptResult | None, target: dict) -> None:
        if self._closing:
            return
        image_name = target["image"]
        c = self.controls
        if result is None:
            c.adapt_status.setText("adaptation cancelled: nothing was saved or added")
            return
        done = result.done
        self._mark_slices(result, image_name)
        if not done.accepted:
            kept = f"; saved anyway as {result.path.name}" if result.path is not None else ""
            message = f"adaptation did not help on this scan; keeping the source model ({done.gate_text}){kept}"
            c.adapt_status.setText(message)
            show_warning(f"napari-convlora: {message}")
            self.timings["adapt"] = time.perf_counter() - self._clicked.pop("adapt", time.perf_counter())
            if result.path is not None:
                self.refresh_adapters()
            return
        what = (
            f"an intensity map, {done.note}"
            if done.adapter.curve is not None
            else f"{done.adapter.trainable_parameters:,} trainable parameters, best epoch {done.best_epoch}"
        )
        then = "its mask is the new layer" if done.segmentation is not None else "segmenting with it..."
        c.adapt_status.setText(f"saved {result.path.name} to the library ({what}, {done.seconds:.1f} s); {then}")
        self.refresh_adapters()
        c.select_adapter(str(result.path))
        if done.segmentation is not None:  # the gate segmented the scan with the adapter already
            label = done.adapter.name or result.path.stem
            self._add_mask(jobs.SegmentResult(done.segmentation, label, f"adapter {label}"), target, after_adapt=True)
            return
        # segment with the new adapter once the adapt worker has finished (see _on_finished)
        self._pending_segment = (str(result.path), self._clicked.pop("adapt", time.perf_counter()))

    def _mark_slices(self, result: jobs.AdaptResult, image_name: str) -> None:
        """List the slices the adapter learned from, and frame each of them with a rectangle over the image."""
        self.adapter_slices = [(result.axis, i) for i in result.file_slices]
        self.controls.show_slices(self.adapter_slices)
        if image_name not in self.viewer.layers or not self.adapter_slices:  # a landmark map reads the whole head
            return
        image = self.viewer.layers[image_name]
        shape = image.data.shape
        a, b = (d for d in range(3) if d != result.axis)
        frames = []
        for axis, index in self.adapter_slices:
            corners = []
            for u, v in ((0, 0), (shape[a] - 1, 0), (shape[a] - 1, shape[b] - 1), (0, shape[b] - 1)):
                corner = [0.0, 0.0, 0.0]
                corner[axis], corner[a], corner[b] = index, u, v
                corners.append(corner)
            frames.append(np.asarray(corners, dtype=float))
        kwargs = aligned_kwargs(image)
        kwargs["metadata"] = {**kwargs["metadata"], MADE_BY_KEY: {"adapter_slices": result.done.adapter.name}}
        self.viewer.add_shapes(
            frames,
            shape_type="rectangle",
            name=f"adapter slices: {result.done.adapter.name}",
            edge_color="yellow",
            face_color="transparent",
            edge_width=max(shape) / 100,
            **kwargs,
        )

    def _jump_to_chosen(self) -> None:
        chosen = self.controls.chosen_slice()
        if chosen is not None:
            self.jump_to_slice(*chosen)

    def jump_to_slice(self, axis: int, index: int) -> None:
        """Show slice ``index`` across file axis ``axis`` of the chosen image, upright (superior up)."""
        try:
            layer = self._image_layer()
        except InputError as exc:
            self._notify_error(exc)
            return
        vertical, horizontal, up, left = upright_view(volume_from_layer(layer).affine, axis)
        dims = self.viewer.dims
        first = dims.ndim - layer.ndim
        dims.order = (*range(first), first + axis, first + vertical, first + horizontal)
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera  # napari >= 0.9
        camera.orientation2d = ("up" if up else "down", "left" if left else "right")
        position = [(n - 1) / 2 for n in layer.data.shape]
        position[axis] = index
        dims.set_point(first + axis, float(layer.data_to_world(position)[axis]))

    # ---------------------------------------------------------------- metrics
    def evaluate(self, errors_for: tuple[str, ...] = ()) -> None:
        """Score every mask this widget made on the ground truth's grid against it."""
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
                if isinstance(layer, Labels)
                and "adapter" in layer.metadata.get(MADE_BY_KEY, {})
                and layer.data.shape == gt_data.shape
            }
            if not masks:
                raise InputError(f"no mask on the grid of {gt.name!r} yet: click Segment first")
            spacing = tuple(float(s) for s in volume_from_layer(gt).spacing)
        except InputError as exc:
            self._notify_error(exc)
            return
        kwargs = aligned_kwargs(gt)
        self.controls.evaluate_button.setEnabled(False)
        self.jobs["metrics"] = self._start(
            "metrics",
            jobs.metrics_job,
            masks,
            gt_data,
            spacing,
            float(self.controls.tau_spin.value()),
            tuple(errors_for),
            on_return=lambda r: self._on_metrics(r, gt.name, kwargs),
            on_error=lambda e: self._on_error("metrics", e),
            on_finish=lambda: self._on_finished("metrics"),
        )

    def _on_metrics(self, result: jobs.MetricsResult | None, gt_name: str, kwargs: dict) -> None:
        if self._closing or result is None:
            return
        self.last_metrics = result
        self.controls.show_metrics(result, gt_name)
        for name, error_map in result.errors.items():
            made = {"surface_errors_of": name, "tolerance_mm": result.tolerance_mm}
            meta = {**kwargs["metadata"], MADE_BY_KEY: made}
            self._put_labels(error_map, f"surface errors: {name}", gt_name, **{**kwargs, "metadata": meta})

    def export_csv(self, path: str | Path) -> Path | None:
        """Write the metrics table to ``path`` (atomically; replaces the file, as the save dialog confirmed)."""
        try:
            if self.last_metrics is None:
                raise InputError("no metrics yet: choose a ground truth and click Evaluate")
            text = jobs.metrics_csv(self.last_metrics)
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
    def _start(self, kind: str, job, *args, **kwargs) -> Job:
        """Start a job in the worker process (or, if it could not start, in a thread: say so once)."""
        self._tell_fallback()
        return start_job(kind, job, *args, process=self.process, **kwargs)

    def _tell_fallback(self) -> None:
        if self.process is not None and self.process.ended and not self.process.failure:
            show_info(f"napari-convlora: the worker process {self.process.ended}; starting a new one for this job")
        if self.process is not None and self.process.failure and not self._told_fallback:
            self._told_fallback = True
            show_warning(
                f"napari-convlora: no worker process ({self.process.failure}); "
                "running in threads of the viewer instead, which may pause it during runs"
            )

    @staticmethod
    def _show_progress(bar, done: int, total: int) -> None:
        bar.setMaximum(max(total, 1))
        bar.setValue(min(done, total))
        bar.setVisible(True)

    def _on_error(self, kind: str, exc: BaseException, device: str = "") -> None:
        if not isinstance(exc, InputError):
            log.error("napari-convlora %s failed", kind, exc_info=exc)
        if self._closing:
            return
        self._clicked.pop(kind, None)
        message = jobs.describe_error(exc, device)
        c = self.controls
        (c.adapt_status if kind == "adapt" else c.status).setText(f"failed: {message}")
        show_error(f"napari-convlora: {message}")

    def _on_finished(self, kind: str) -> None:
        self.jobs.pop(kind, None)
        if self._closing:
            return
        self._tell_fallback()  # the process may have failed while this job waited for it
        bar = {"segment": self.controls.segment_progress, "adapt": self.controls.adapt_progress}.get(kind)
        if bar is not None:
            bar.setVisible(False)
        if kind == "metrics":
            self.controls.evaluate_button.setEnabled(True)
        self._show_running()
        if kind == "adapt" and self._pending_segment is not None:
            spec, clicked = self._pending_segment
            self._pending_segment = None
            self._clicked["adapt"] = clicked
            self._segment_after_adapt = True
            self.segment(spec)
            if "segment" not in self.jobs:
                self._segment_after_adapt = False

    def _notify_error(self, exc: BaseException) -> None:
        self._clicked.pop("segment", None)
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
        self.batch.stop(wait_s)
        if self.process is not None:
            self.process.close()

    def showEvent(self, event) -> None:  # Qt's method name
        window = self.window()
        if window is not self and id(window) != self._watched:
            window.installEventFilter(self._watcher)
            self._watched = id(window)
        if not self._warmed:
            self._warmed = True
            QTimer.singleShot(0, self._warm_up_layers)
        super().showEvent(event)

    def _warm_up_layers(self) -> None:
        """Pay napari's first-use costs of Labels and Shapes layers now, while the user opens a scan.

        The first Labels layer of a session costs ~0.6 s on the GUI thread, the
        second ~0.23 s, the first Shapes layer ~0.22 s; once paid, each later one
        ~0.08 s (measured under Xvfb). Without this the viewer freezes for that
        long just when the first mask arrives. Hidden, 1-voxel layers, removed at once.
        """
        if self._closing:
            return
        for make in (self.viewer.add_labels, self.viewer.add_labels, self.viewer.add_shapes):
            data = np.zeros((1, 1, 1), dtype=np.uint8) if make == self.viewer.add_labels else None
            layer = make(data, name="convlora warm-up", visible=False)
            self.viewer.layers.remove(layer)


def _default_name(layer_name: str) -> str:
    """A valid adapter name from a layer name (letters, digits, '.', '_', '-')."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in layer_name).strip("-.") or "adapter"
    return cleaned[:64]
