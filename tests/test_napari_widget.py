"""The widget driven as a user would, in a real napari viewer (pytest-qt, Xvfb), through real thread workers.

Models are tiny (width 4, random weights) and the head is the sample at 4 mm,
so each run takes seconds; what is checked is the mechanics: layers appear
with the right grid, adapters are saved and chosen, Cancel leaves nothing
behind, metrics match the core's.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari.layers import Labels

from napari_convlora import adapt as adapt_module
from napari_convlora._napari import jobs
from napari_convlora._napari.controls import AROUND
from napari_convlora._napari.layers import MADE_BY_KEY
from napari_convlora._napari.widget import ConvLoRAWidget
from napari_convlora.adapters import load_adapter
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume

TIMEOUT_MS = 120_000


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, gate_open):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CONVLORA_TORCH_THREADS", "1")  # a worker process inherits it
    torch.set_num_threads(1)
    monkeypatch.setattr(jobs, "worker_threads", lambda: 1)


@pytest.fixture
def viewer_widget(make_napari_viewer_proxy, qtbot, model_file, small_path, small_mask_path):
    viewer = make_napari_viewer_proxy()
    viewer.open(str(small_path), plugin="napari-convlora")
    viewer.open(str(small_mask_path), plugin="napari-convlora")
    # the thread path: the monkeypatches of these tests (e.g. gate_open) reach it; the process path is tested below
    widget = ConvLoRAWidget(viewer, model_path=model_file, worker="thread")
    viewer.window.add_dock_widget(widget, name="ConvLoRA Skull Strip")
    return viewer, widget


@pytest.fixture
def process_widget(make_napari_viewer_proxy, qtbot, model_file, small_path, small_mask_path):
    viewer = make_napari_viewer_proxy()
    viewer.open(str(small_path), plugin="napari-convlora")
    viewer.open(str(small_mask_path), plugin="napari-convlora")
    widget = ConvLoRAWidget(viewer, model_path=model_file)  # the default: a worker process
    viewer.window.add_dock_widget(widget, name="ConvLoRA Skull Strip")
    assert widget.process is not None and widget.process.wait_ready(), widget.process.failure
    return viewer, widget


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.jobs, timeout=TIMEOUT_MS)


def test_segment_sample_with_ground_truth(viewer_widget, qtbot, small_path, small_mask_path, model_file):
    viewer, widget = viewer_widget
    assert widget.controls.image_combo.currentText() == "head4mm"
    assert widget.controls.gt_combo.currentText() == "mask4mm"  # the opened reference mask is offered as ground truth
    assert widget.controls.adapter_combo.currentText() == jobs.SOURCE_LABEL
    assert "CPU" in widget.controls.device_note.text() or "cpu" in widget.controls.device_note.text()
    widget.controls.errors_check.setChecked(True)
    widget.controls.segment_button.click()
    assert widget.controls.segment_button.isEnabled() is False  # a real worker is running
    _wait_idle(qtbot, widget)
    mask_layer = viewer.layers["mask: source"]
    image = viewer.layers["head4mm"]
    assert mask_layer.data.shape == image.data.shape and mask_layer.data.dtype == np.uint8
    np.testing.assert_array_equal(mask_layer.scale, image.scale)
    np.testing.assert_array_equal(mask_layer.translate, image.translate)
    np.testing.assert_array_equal(mask_layer.metadata["nifti_affine"], load_volume(small_path).affine)
    assert mask_layer.metadata[MADE_BY_KEY]["adapter"] == "source"
    # the core's own segmentation of the same file gives the same mask
    from napari_convlora.inference import segment

    expected = segment(load_model(model_file), load_volume(small_path), device="cpu").mask
    np.testing.assert_array_equal(mask_layer.data, expected)
    # metrics (started automatically with a ground truth) equal the core's figures
    assert widget.last_metrics is not None
    gt = load_mask(small_mask_path)
    figures = evaluate(expected, gt.data, gt.spacing, 1.0)
    row = widget.last_metrics.rows["mask: source"]
    assert row["dice"] == pytest.approx(figures["dice"]) and row["surface_dice"] == pytest.approx(
        figures["surface_dice"]
    )
    assert (
        widget.controls.table.columnCount() == 2 and widget.controls.table.item(0, 0).text() == f"{figures['dice']:.3f}"
    )
    errors = viewer.layers["surface errors: mask: source"]
    assert set(np.unique(errors.data)) <= {0, 1, 2} and errors.data.any()
    assert "from Segment click" in widget.controls.status.text() and widget.timings["segment"] > 0
    # a second Segment makes a new layer, never touching the first (which the user may have edited)
    mask_layer.data[0, 0, 0] = 7
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert mask_layer.data[0, 0, 0] == 7
    second = [layer.name for layer in viewer.layers if layer.name.startswith("mask: source [")]
    assert len(second) == 1
    # both masks are scored side by side; the surface errors layers are never taken for masks
    assert set(widget.last_metrics.rows) == {"mask: source", second[0]}


def test_adapt_with_the_moe_kind(viewer_widget, qtbot, tmp_path):
    viewer, widget = viewer_widget
    assert widget.controls.kind_combo.currentText() == "convlora"  # the default
    assert widget.controls.adabn_check.isChecked()  # the default
    widget.controls.kind_combo.setCurrentText("moe")
    widget.controls.adabn_check.setChecked(False)
    widget.controls.slices_spin.setValue(2)
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(1)
    widget.controls.name_edit.setText("scanner-m")
    widget.controls.adapt_button.click()
    _wait_idle(qtbot, widget)
    adapter = load_adapter(tmp_path / "home" / "adapters" / "scanner-m.safetensors")
    assert adapter.metadata["kind"] == "moe" and adapter.metadata["experts"] == 8
    assert adapter.metadata["adabn"] is False
    assert "mask: scanner-m" in viewer.layers


def test_adapt_by_default_keeps_an_intensity_map_and_greys_out_training_settings(
    viewer_widget, qtbot, tmp_path, monkeypatch, model_file
):
    from napari_convlora import selection
    from napari_convlora.inference import segment

    viewer, widget = viewer_widget
    c = widget.controls
    assert c.objective_combo.currentText() == "intensity"
    assert not any(w.isEnabled() for w in (c.slices_spin, c.epochs_spin, c.lr_spin, c.kind_combo, c.adabn_check))
    c.objective_combo.setCurrentText("early-head")
    assert c.epochs_spin.isEnabled() and c.kind_combo.isEnabled()
    c.objective_combo.setCurrentText("intensity")
    sure = iter((0.60, 0.65, 0.59))  # plain, head step, brain step: the head step passes the gate (no reference)
    monkeypatch.setattr(selection, "mask_confidence", lambda probability, mask: next(sure))
    c.name_edit.setText("scanner-i")
    c.adapt_button.click()
    _wait_idle(qtbot, widget)
    path = tmp_path / "home" / "adapters" / "scanner-i.safetensors"
    adapter = load_adapter(path)
    assert adapter.metadata["kind"] == "intensity" and adapter.metadata["input"] == "head" and not adapter.tensors
    assert "an intensity map, intensities standardised, head" in c.adapt_status.text()
    assert c.adapt_status.text().endswith("its mask is the new layer")  # the rule's own segmentation, not made again
    assert c.train_plot.title.startswith("intensity curve")
    assert c.adapter_combo.currentText() == "scanner-i"
    volume = load_volume(viewer.layers["head4mm"].source.path)
    expected = segment(load_model(model_file), volume, adapter, device="cpu")  # the map as one curve: the same mask
    assert np.mean(viewer.layers["mask: scanner-i"].data == expected.mask) > 0.999


def test_adapt_saves_selects_and_segments(viewer_widget, qtbot, tmp_path, model_file):
    viewer, widget = viewer_widget
    widget.controls.slices_spin.setValue(2)
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(1)
    widget.controls.name_edit.setText("scanner-b")
    before = load_model(model_file).model_id
    widget.controls.adapt_button.click()
    assert widget.controls.adapt_button.text() == "Cancel"
    _wait_idle(qtbot, widget)
    path = tmp_path / "home" / "adapters" / "scanner-b.safetensors"
    assert path.is_file()
    adapter = load_adapter(path)
    assert adapter.name == "scanner-b" and adapter.metadata["epochs"] == 1 and len(adapter.metadata["slices"]) == 2
    assert adapter.base_model_id == before == load_model(model_file).model_id
    assert widget.controls.adapter_combo.currentText() == "scanner-b"
    assert "mask: scanner-b" in viewer.layers
    assert viewer.layers["mask: scanner-b"].data.shape == viewer.layers["head4mm"].data.shape
    # the mask is the gate's whole-scan segmentation with the adapter, reused: the core's own, not made twice
    from napari_convlora.inference import segment

    expected = segment(load_model(model_file), load_volume(viewer.layers["head4mm"].source.path), adapter, device="cpu")
    np.testing.assert_array_equal(viewer.layers["mask: scanner-b"].data, expected.mask)
    assert widget.timings["adapt"] > 0 and widget.controls.adapt_button.text() == "Adapt"
    assert widget.controls.train_plot.series["loss"] and widget.controls.train_plot.series["consistency"]
    assert widget.controls.slice_list.count() == 2
    frames = viewer.layers["adapter slices: scanner-b"]  # a rectangle framing each learned slice
    assert len(frames.data) == 2
    for frame, (axis, index) in zip(frames.data, widget.adapter_slices, strict=True):
        np.testing.assert_array_equal(frame[:, axis], index)
    axis, index = widget.adapter_slices[0]
    widget.jump_to_slice(axis, index)
    assert viewer.dims.order[0] == axis and viewer.dims.current_step[axis] == index
    # source and adapted side by side in the metrics table
    qtbot.waitUntil(lambda: widget.last_metrics is not None and len(widget.last_metrics.rows) == 1, timeout=TIMEOUT_MS)
    widget.controls.evaluate_button.click()
    _wait_idle(qtbot, widget)
    assert set(widget.last_metrics.rows) == {"mask: scanner-b"}
    # "auto" ranks the source model and the library's adapter by feature-statistics fit and says why
    widget.controls.adapter_combo.setCurrentText(jobs.AUTO_LABEL)
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert "auto chose" in widget.controls.status.text() and "scanner-b" in widget.controls.status.text()
    csv_path = widget.export_csv(tmp_path / "metrics.csv")
    assert csv_path.read_text().splitlines()[0].startswith("mask,dice,surface_dice")
    # the same name again is refused up front, with the file left as it was
    stamp = path.stat().st_mtime_ns
    widget.controls.adapt_button.click()
    assert not widget.jobs and path.stat().st_mtime_ns == stamp


def test_an_adapter_the_gate_rejects_is_not_saved_or_used_and_the_user_is_told(
    viewer_widget, qtbot, tmp_path, monkeypatch
):
    viewer, widget = viewer_widget
    monkeypatch.setattr(adapt_module, "accepted", lambda *args: False)
    warnings = []
    monkeypatch.setattr("napari_convlora._napari.widget.show_warning", warnings.append)
    widget.controls.slices_spin.setValue(2)
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(1)
    widget.controls.name_edit.setText("scanner-r")
    layers = {layer.name for layer in viewer.layers}
    widget.controls.adapt_button.click()
    _wait_idle(qtbot, widget)
    assert "adaptation did not help on this scan; keeping the source model" in warnings[-1]
    assert "did not help" in widget.controls.adapt_status.text()
    assert not (tmp_path / "home" / "adapters" / "scanner-r.safetensors").exists()
    assert "mask: scanner-r" not in viewer.layers
    assert {layer.name for layer in viewer.layers} - layers == {
        "adapter slices: scanner-r"
    }  # where it looked, nothing more
    # asked to keep it: saved (marked rejected), still not used to segment
    widget.controls.keep_rejected_check.setChecked(True)
    widget.controls.name_edit.setText("scanner-k")
    widget.controls.adapt_button.click()
    _wait_idle(qtbot, widget)
    kept = load_adapter(tmp_path / "home" / "adapters" / "scanner-k.safetensors")
    assert kept.metadata["accepted"] is False and "saved anyway" in warnings[-1]
    assert "mask: scanner-k" not in viewer.layers


def test_cancel_leaves_everything_as_before(viewer_widget, qtbot, tmp_path, model_file):
    viewer, widget = viewer_widget
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(100)
    widget.controls.slices_spin.setValue(4)
    widget.controls.slice_mode.setCurrentText(AROUND)
    widget.controls.name_edit.setText("never-saved")
    layers_before = [layer.name for layer in viewer.layers]
    widget.controls.adapt_button.click()
    qtbot.waitUntil(lambda: len(widget.controls.train_plot.series.get("loss", [])) >= 2, timeout=TIMEOUT_MS)
    widget.controls.adapt_button.click()  # Cancel
    assert widget.controls.adapt_button.text() == "Cancelling..."
    _wait_idle(qtbot, widget)
    assert len(widget.controls.train_plot.series["loss"]) < 100  # stopped long before the end
    assert not (tmp_path / "home" / "adapters").exists() or not any((tmp_path / "home" / "adapters").iterdir())
    assert [layer.name for layer in viewer.layers] == layers_before
    assert "cancelled" in widget.controls.adapt_status.text() and widget.controls.adapt_button.text() == "Adapt"
    assert jobs.get_model(model_file).model_id == load_model(model_file).model_id


def test_errors_become_notifications(viewer_widget, qtbot, tmp_path, monkeypatch):
    viewer, widget = viewer_widget
    messages = []
    monkeypatch.setattr("napari_convlora._napari.widget.show_error", messages.append)
    widget.controls.name_edit.setText("bad name!")
    widget.controls.adapt_button.click()
    assert "invalid adapter name" in messages[-1] and not widget.jobs
    widget.controls.gt_combo.setCurrentText("(none)")
    widget.controls.evaluate_button.click()
    assert "no ground truth" in messages[-1]
    # an adapter made for another base model is refused with a clear message
    other = tmp_path / "other.safetensors"
    from napari_convlora.adapt import AdaptConfig, run_adaptation

    from .conftest import make_model

    done = run_adaptation(
        make_model(seed=1),
        load_volume(widget.viewer.layers["head4mm"].metadata["nifti_path"]),
        AdaptConfig(objective="early-head", slices=1, epochs=1, device="cpu"),
        name="other",
    )
    from napari_convlora.adapters import save_adapter

    save_adapter(done.adapter, other)
    n_layers = len(viewer.layers)
    widget.segment(str(other))
    _wait_idle(qtbot, widget)
    assert "adapter made for base model" in messages[-1]
    assert len(viewer.layers) == n_layers
    widget.controls.device_combo.setCurrentText("cuda")
    if not torch.cuda.is_available():
        widget.controls.segment_button.click()
        _wait_idle(qtbot, widget)
        assert "no CUDA GPU" in messages[-1]
    widget.controls.image_combo.clear()
    widget.controls.segment_button.click()
    assert "no MRI image" in messages[-1]


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_closing_the_viewer_stops_a_run(make_napari_viewer, qtbot, model_file, small_path, tmp_path, worker):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(small_path), plugin="napari-convlora")
    widget = ConvLoRAWidget(viewer, model_path=model_file, worker=worker)
    viewer.window.add_dock_widget(widget)
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(100)
    widget.controls.name_edit.setText("closed")
    widget.controls.adapt_button.click()
    job = widget.jobs["adapt"]
    qtbot.waitUntil(lambda: len(widget.controls.train_plot.series.get("loss", [])) >= 1, timeout=TIMEOUT_MS)
    viewer.close()
    assert job.finished.is_set() and job.stop.is_set()
    assert not (tmp_path / "home" / "adapters" / "closed.safetensors").exists()
    qtbot.waitUntil(lambda: not job.worker.is_running, timeout=TIMEOUT_MS)
    if worker == "process":  # closing the viewer ends the worker process
        pid = widget.process.pid
        assert pid is not None and pid != os.getpid() and not widget.process.alive
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_process_path_segments_as_the_core_does(process_widget, qtbot, small_path, model_file):
    viewer, widget = process_widget
    assert widget.process.pid != os.getpid()
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    from napari_convlora.inference import segment

    expected = segment(load_model(model_file), load_volume(small_path), device="cpu").mask
    np.testing.assert_array_equal(viewer.layers["mask: source"].data, expected)
    assert widget.last_metrics is not None and "mask: source" in widget.last_metrics.rows  # metrics ran there too
    assert widget.timings["segment"] > 0 and widget.process.alive  # the process stays for the next job


def test_the_test_time_flips_choice_reaches_the_worker_process(process_widget, qtbot, small_path, model_file):
    viewer, widget = process_widget
    combo = widget.controls.tta_combo
    combo.setCurrentIndex(combo.findData(4))
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    from napari_convlora.inference import segment

    expected = segment(load_model(model_file), load_volume(small_path), device="cpu", tta=4).mask
    np.testing.assert_array_equal(viewer.layers["mask: source"].data, expected)
    assert widget.controls.status.text().endswith("4 mirror views")


def test_the_standardise_choice_reaches_the_worker_process(process_widget, qtbot, small_path, model_file):
    viewer, widget = process_widget
    combo = widget.controls.standardize_combo
    combo.setCurrentIndex(combo.findData("on"))
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    from napari_convlora.inference import segment

    expected = segment(load_model(model_file), load_volume(small_path), device="cpu", standardize=True).mask
    np.testing.assert_array_equal(viewer.layers["mask: source"].data, expected)
    assert widget.controls.status.text().endswith("intensities standardised")


def test_cancel_in_the_process_path_leaves_no_adapter_and_no_layer(process_widget, qtbot, tmp_path):
    viewer, widget = process_widget
    names = [layer.name for layer in viewer.layers]
    widget.controls.objective_combo.setCurrentText("early-head")
    widget.controls.epochs_spin.setValue(100)
    widget.controls.name_edit.setText("cancelled-p")
    widget.controls.adapt_button.click()
    qtbot.waitUntil(lambda: len(widget.controls.train_plot.series.get("loss", [])) >= 1, timeout=TIMEOUT_MS)
    started = time.perf_counter()
    widget.controls.adapt_button.click()  # Cancel
    _wait_idle(qtbot, widget)
    assert time.perf_counter() - started < 30  # within a step or so, not after 100 epochs
    assert "cancelled" in widget.controls.adapt_status.text()
    assert not (tmp_path / "home" / "adapters").exists() or not list((tmp_path / "home" / "adapters").iterdir())
    assert [layer.name for layer in viewer.layers] == names
    widget.controls.segment_button.click()  # the same process serves the next job
    _wait_idle(qtbot, widget)
    assert "mask: source" in viewer.layers


def test_an_error_in_the_worker_process_becomes_a_notification(process_widget, qtbot, tmp_path, monkeypatch):
    viewer, widget = process_widget
    messages = []
    monkeypatch.setattr("napari_convlora._napari.widget.show_error", messages.append)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    widget.model_path = bad
    n_layers = len(viewer.layers)
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert len(messages) == 1 and "broken.safetensors" in messages[0]
    assert len(viewer.layers) == n_layers and widget.process.alive


def test_without_a_worker_process_jobs_run_in_threads_and_the_user_is_told(
    make_napari_viewer_proxy, qtbot, model_file, small_path, monkeypatch
):
    from napari_convlora._napari import job_process

    monkeypatch.setattr(job_process.sys, "executable", "/nonexistent/python")
    warnings = []
    monkeypatch.setattr("napari_convlora._napari.widget.show_warning", warnings.append)
    viewer = make_napari_viewer_proxy()
    viewer.open(str(small_path), plugin="napari-convlora")
    widget = ConvLoRAWidget(viewer, model_path=model_file)
    viewer.window.add_dock_widget(widget)
    assert not widget.process.wait_ready() and "nonexistent" in widget.process.failure
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert "mask: source" in viewer.layers
    assert len(warnings) == 1 and "running in threads" in warnings[0]


def test_plugin_menu_widget_and_gui_launcher(make_napari_viewer_proxy, qtbot, model_file):
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-convlora", "ConvLoRA Skull Strip")  # napari -w
    assert isinstance(widget, ConvLoRAWidget)
    viewer.open_sample("napari-convlora", "colin27-t1")
    viewer.open_sample("napari-convlora", "colin27-mask")
    assert widget.controls.image_combo.currentText() == "colin27_t1"
    assert widget.controls.gt_combo.currentText() == "colin27_mask_consensus"
    assert isinstance(viewer.layers["colin27_mask_consensus"], Labels)
    from napari_convlora.cli import build_parser

    args = build_parser().parse_args(["gui", "--sample", "--model", str(model_file)])
    assert args.command == "gui" and args.sample and args.model == model_file


def test_gui_launcher_opens_the_widget_with_the_sample(qtbot, model_file):
    from napari_convlora._napari.launch import open_viewer

    viewer, widget = open_viewer(sample=True, model=model_file, show=False)
    try:
        assert widget.controls.image_combo.currentText() == "colin27_t1_philips-3t"
        assert widget.controls.gt_combo.currentText() == "colin27_mask_philips-3t"
        assert widget.model_path == model_file
    finally:
        viewer.close()


def test_library_actions_import_rename_export_remove(viewer_widget, tmp_path, monkeypatch):
    from napari_convlora._napari import widget as widget_module
    from napari_convlora.adapters import save_adapter

    from .conftest import make_model
    from .test_adapter_files import trained_adapter

    _, widget = viewer_widget
    messages = []
    monkeypatch.setattr(widget_module, "show_error", messages.append)
    library = tmp_path / "home" / "adapters"
    shared = save_adapter(trained_adapter(make_model(4), "site-a"), tmp_path / "from-site-a.safetensors")

    assert widget.import_adapter(shared) == library / "site-a.safetensors"
    assert widget.controls.adapter_combo.currentText() == "site-a"  # imported and selected
    # the same file again: the name is taken, so the widget asks for another one
    asked = []
    monkeypatch.setattr(
        widget_module.QInputDialog, "getText", lambda *args, **kw: asked.append(kw["text"]) or ("site-a2", True)
    )
    assert widget.import_adapter(shared) == library / "site-a2.safetensors" and asked == ["site-a-2"]

    assert widget.rename_adapter("site-b") == library / "site-b.safetensors"
    assert sorted(p.name for p in library.iterdir()) == ["site-a.safetensors", "site-b.safetensors"]
    assert widget.controls.adapter_combo.currentText() == "site-b"

    exported = widget.export_adapter(tmp_path / "to-site-c.safetensors")
    assert exported == tmp_path / "to-site-c.safetensors" and load_adapter(exported).name == "site-a"

    monkeypatch.setattr(widget_module.QMessageBox, "question", lambda *a: widget_module.QMessageBox.StandardButton.Yes)
    widget._remove_dialog()
    assert sorted(p.name for p in library.iterdir()) == ["site-a.safetensors"]
    assert widget.controls.adapter_combo.findText("site-b") == -1

    # refusals are notifications and change nothing
    widget.controls.select_adapter(jobs.SOURCE_LABEL)
    assert widget.remove_adapter() is None and "choose an adapter of the library" in messages[-1]
    builtins = [i for i in range(widget.controls.adapter_combo.count()) if "(built-in)" in
                widget.controls.adapter_combo.itemText(i)]  # fmt: skip
    if builtins:
        widget.controls.adapter_combo.setCurrentIndex(builtins[0])
        assert widget.rename_adapter("mine") is None and "built-in adapter" in messages[-1]
    widget.controls.select_adapter(str(library / "site-a.safetensors"))
    assert widget.rename_adapter("bad name!") is None and "invalid adapter name" in messages[-1]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not an adapter")
    assert widget.import_adapter(broken) is None and str(broken) in messages[-1]
    assert sorted(p.name for p in library.iterdir()) == ["site-a.safetensors"]


def test_a_worker_process_that_dies_is_replaced_for_the_next_job(process_widget, qtbot, monkeypatch):
    import signal

    viewer, widget = process_widget
    said = {"info": [], "warning": []}
    monkeypatch.setattr("napari_convlora._napari.widget.show_info", said["info"].append)
    monkeypatch.setattr("napari_convlora._napari.widget.show_warning", said["warning"].append)
    first = widget.process.pid
    os.kill(first, signal.SIGKILL)  # e.g. the system's out-of-memory killer
    qtbot.waitUntil(lambda: widget.process.ended is not None, timeout=TIMEOUT_MS)
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert "mask: source" in viewer.layers
    assert any("ended" in m and "starting a new one" in m for m in said["info"]) and not said["warning"]
    assert widget.process.alive and widget.process.pid not in (None, first) and widget.process.restarts == 1


def test_after_too_many_deaths_jobs_go_on_in_threads_and_the_user_is_told(process_widget, qtbot, monkeypatch):
    import signal

    from napari_convlora._napari import job_process

    viewer, widget = process_widget
    monkeypatch.setattr(job_process, "MAX_RESTARTS", 0)
    warnings = []
    monkeypatch.setattr("napari_convlora._napari.widget.show_warning", warnings.append)
    os.kill(widget.process.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: widget.process.ended is not None, timeout=TIMEOUT_MS)
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert "mask: source" in viewer.layers and not widget.process.alive and widget.process.restarts == 0
    assert len(warnings) == 1 and "ended" in warnings[0] and "running in threads" in warnings[0]


def test_a_result_refreshes_the_widgets_own_layer_but_never_one_the_user_changed(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    layer = viewer.layers["mask: source"]
    names = [x.name for x in viewer.layers]
    first = np.array(layer.data)
    widget.controls.segment_button.click()  # the same result again: the same layer, refreshed
    _wait_idle(qtbot, widget)
    # (the test's viewer hands out proxies of layers: the same layer is the same unique_id)
    assert [x.name for x in viewer.layers] == names and viewer.layers["mask: source"].unique_id == layer.unique_id
    np.testing.assert_array_equal(layer.data, first)
    painted = np.array(layer.data)
    painted[0, 0, 0] = 1 - painted[0, 0, 0]
    layer.data = painted  # the user corrects the mask
    widget.controls.segment_button.click()
    _wait_idle(qtbot, widget)
    assert viewer.layers["mask: source"].unique_id == layer.unique_id  # untouched, edit kept ...
    np.testing.assert_array_equal(layer.data, painted)
    fresh = [x for x in viewer.layers if x.name.startswith("mask: source") and x.unique_id != layer.unique_id]
    assert len(fresh) == 1  # ... and the new result went into a new layer
    np.testing.assert_array_equal(fresh[0].data, first)


def test_the_curve_fit_shows_its_own_progress(viewer_widget):
    from napari_convlora.inference import SegmentProgress
    from napari_convlora.intensity_curve import CurveStep

    _, widget = viewer_widget
    widget._on_segment_progress(CurveStep(step=15, steps=60, distance=1.2, elapsed_s=10.0))
    assert widget.controls.status.text() == "learning the intensity curve: step 15/60, about 30 s left"
    widget._on_segment_progress(SegmentProgress(done=10, total=40, elapsed_s=5.0))
    assert widget.controls.status.text() == "segmenting: 10/40 slices, about 15 s left"
