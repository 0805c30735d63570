"""The widget's Batch box: ``convlora batch`` on a folder in its own process, progress, failures, cancel.

Real runs: the box starts the real command (a local dask cluster of one worker)
on a few 4 mm heads with the tiny random model, so each run takes tens of seconds.
"""

from __future__ import annotations

import csv
import shutil

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("distributed")
pytest.importorskip("psutil")

import psutil

from napari_convlora._napari import batch_panel
from napari_convlora._napari.widget import ConvLoRAWidget
from napari_convlora.errors import InputError

RUN_TIMEOUT_MS = 240_000
SCANS_TO_CANCEL = 40


@pytest.fixture
def panel(make_napari_viewer_proxy, qtbot, model_file, monkeypatch, tmp_path):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer_proxy()
    widget = ConvLoRAWidget(viewer, model_path=model_file, worker="thread")
    viewer.window.add_dock_widget(widget)
    said = {"info": [], "warning": [], "error": []}
    for kind in said:
        monkeypatch.setattr(batch_panel, f"show_{kind}", said[kind].append)
    widget.controls.device_combo.setCurrentText("cpu")
    return widget.batch, said


def _scans(tmp_path, small_path, n: int, broken: bool) -> tuple:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(n):
        shutil.copy(small_path, folder / f"sub-{i:02d}_T1w.nii.gz")
    if broken:
        (folder / "sub-99_T1w.nii.gz").write_bytes(b"not a nifti file")
    return folder, tmp_path / "masks"


def _run(box, folder, outdir) -> None:
    box.input_edit.setText(str(folder))
    box.output_edit.setText(str(outdir))
    box.run_button.click()


def _rows(outdir) -> list[dict]:
    with (outdir / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_batch_runs_a_folder_reports_a_failed_scan_and_resumes(panel, qtbot, tmp_path, small_path):
    box, said = panel
    folder, outdir = _scans(tmp_path, small_path, 2, broken=True)
    _run(box, folder, outdir)
    assert box.running and not box.progress.isHidden() and box.progress.maximum() == 3
    qtbot.waitUntil(lambda: not box.running, timeout=RUN_TIMEOUT_MS)
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in _rows(outdir)}
    assert rows["sub-00_T1w.nii.gz"]["status"] == "ok" and rows["sub-01_T1w.nii.gz"]["status"] == "ok"
    assert rows["sub-99_T1w.nii.gz"]["status"] == "error" and "sub-99_T1w.nii.gz" in rows["sub-99_T1w.nii.gz"]["error"]
    assert (outdir / "sub-00_T1w_mask.nii.gz").is_file() and not (outdir / "sub-99_T1w_mask.nii.gz").exists()
    assert "1 of 3 scan(s) failed" in said["warning"][-1] and not said["error"]
    assert box.progress.isHidden() and box.run_button.text() == "Run batch"
    (folder / "sub-99_T1w.nii.gz").unlink()  # the user removes the broken scan and runs the folder again
    box.run_button.click()
    assert not box.running and "already done" in said["info"][-1]


def test_cancel_ends_the_command_and_its_workers_and_keeps_what_is_done(panel, qtbot, tmp_path, small_path):
    box, said = panel
    # enough scans that work is left when the cancel lands (a 4 mm head takes well under a second)
    folder, outdir = _scans(tmp_path, small_path, SCANS_TO_CANCEL, broken=False)
    _run(box, folder, outdir)
    command = psutil.Process(int(box.process.processId()))
    qtbot.waitUntil(lambda: len(command.children(recursive=True)) >= 1, timeout=RUN_TIMEOUT_MS)  # the cluster is up
    children = command.children(recursive=True)
    box.run_button.click()  # Cancel
    assert box.run_button.text() == "Cancel batch" and not box.run_button.isEnabled()
    qtbot.waitUntil(lambda: not box.running, timeout=RUN_TIMEOUT_MS)
    assert "cancelled" in said["info"][-1] and box.status.text() == "cancelled"
    _, alive = psutil.wait_procs([command, *children], timeout=30)
    assert not alive, f"still running after cancel: {[p.pid for p in alive]}"
    masks = sorted(p.name for p in outdir.glob("*.nii.gz")) if outdir.exists() else []
    done = [r for r in _rows(outdir) if r["status"] == "ok"] if (outdir / "results.csv").exists() else []
    assert len(masks) == len(done) < SCANS_TO_CANCEL  # every mask on disk is a finished row; nothing half-written
    assert not [p for p in outdir.iterdir() if p.name not in {*masks, "results.csv"}] if outdir.exists() else True


def test_bad_folders_are_refused_at_once_with_a_notification(panel, tmp_path, small_path):
    box, said = panel
    box.run_button.click()
    assert "choose a folder of scans" in said["error"][-1] and not box.running
    box.input_edit.setText(str(tmp_path / "nowhere"))
    box.output_edit.setText(str(tmp_path / "masks"))
    box.run_button.click()
    assert "nowhere: no such folder" in said["error"][-1] and not box.running
    empty = tmp_path / "empty"
    empty.mkdir()
    box.input_edit.setText(str(empty))
    box.run_button.click()
    assert "no NIfTI scans" in said["error"][-1] and not box.running
    folder, outdir = _scans(tmp_path, small_path, 1, broken=False)
    outdir.mkdir()
    (outdir / "sub-00_T1w_mask.nii.gz").write_bytes(b"someone else's mask")
    _run(box, folder, outdir)
    assert "sub-00_T1w_mask.nii.gz: already exists" in said["error"][-1] and not box.running
    assert (outdir / "sub-00_T1w_mask.nii.gz").read_bytes() == b"someone else's mask"
    (tmp_path / "file").write_text("x")
    box.input_edit.setText(str(tmp_path / "empty"))
    box.output_edit.setText(str(tmp_path / "file"))
    box.run_button.click()
    assert "is a file" in said["error"][-1] and not box.running


def test_the_widget_at_its_narrowest_shows_every_box_whole(make_napari_viewer_proxy, qtbot, model_file):
    """No box is cut off at the right edge (the scroll area never scrolls sideways), however narrow the dock."""
    from qtpy.QtWidgets import QScrollArea

    widget = ConvLoRAWidget(make_napari_viewer_proxy(), model_path=model_file, worker="thread")
    qtbot.addWidget(widget)
    widget.show()
    widget.resize(widget.minimumWidth(), 900)
    scroll = widget.findChild(QScrollArea)
    qtbot.waitUntil(lambda: scroll.viewport().width() <= widget.minimumWidth())
    assert scroll.viewport().width() >= widget.controls.minimumSizeHint().width()


def test_the_command_carries_the_widgets_choices(panel, tmp_path, small_path, model_file):
    """Adapter, device, model and test-time flips of the widget reach ``convlora batch`` (nothing is run)."""
    box, _ = panel
    folder, outdir = _scans(tmp_path, small_path, 1, broken=False)
    widget = box.parent()
    while not isinstance(widget, ConvLoRAWidget):
        widget = widget.parent()
    widget.controls.tta_combo.setCurrentIndex(widget.controls.tta_combo.findData(4))
    box.input_edit.setText(str(folder))
    box.output_edit.setText(str(outdir))
    command, _, todo, _ = box._plan()
    assert todo == 1

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--adapter") == "none" and value("--device") == "cpu" and value("--tta") == "4"
    assert value("--model") == str(model_file) and value("--standardize") == "off"
    widget.controls.standardize_combo.setCurrentIndex(widget.controls.standardize_combo.findData("auto"))
    assert box._plan()[0][box._plan()[0].index("--standardize") + 1] == "auto"
    box.adapt_check.setChecked(True)  # adapt per scan: standardise on or off, not auto (the command's own refusal)
    with pytest.raises(InputError, match="--standardize auto and --adapter adapt"):
        box._plan()
