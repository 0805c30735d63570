"""The widget's "Batch" box: ``convlora batch`` on a folder, in its own process, with progress.

The cohort runs exactly as on the command line (dask.distributed, resumable,
masks written atomically, one results row per scan), in a child process
started with ``QProcess``, so nothing of it runs in the viewer's process and
the event loop never waits on it. Progress is the number of rows the run has
appended to ``OUTDIR/results.csv``, read on a timer. Cancel sends SIGINT (the
command closes its cluster and exits; the rows written stay, and running the
same folder again resumes), and kills it if it has not ended within
``STOP_WAIT_S``. What the command says on failure becomes a napari notification.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QProcess, QTimer
from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QGroupBox, QLabel, QLineEdit, QPushButton, QWidget

from ..batch import RESULTS_CSV, ResultsTable, check_standardize, plan_scans
from ..errors import InputError
from .controls import _progress_bar, _row

POLL_MS = 1000
STOP_WAIT_S = 20.0


class BatchPanel(QGroupBox):
    """Input folder, output folder, Run / Cancel, a progress bar and a status line.

    ``options()`` gives what the widget's own choices say: the ``--adapter``
    value for its adapter choice, the device, the base model file or None, the
    test-time mirror views (``--tta``) and ``--standardize`` (off, on, auto).
    """

    def __init__(
        self, options: Callable[[], tuple[str, str, Path | None, int, str]], parent: QWidget | None = None
    ) -> None:
        super().__init__("Batch: a folder of scans (convlora batch)", parent)
        self._options = options
        self.process: QProcess | None = None
        self._outdir: Path | None = None
        self._rows_before = 0
        self._todo = 0
        self._stdout = b""
        self._stderr = b""
        self._cancelled = False
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self._kill)

        form = QFormLayout(self)
        self.input_edit = QLineEdit()
        self.input_edit.setPlaceholderText("folder of NIfTI scans")
        self.input_button = QPushButton("Choose...")
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("folder for the masks and results.csv")
        self.output_button = QPushButton("Choose...")
        self.adapt_check = QCheckBox("adapt to each scan")
        self.adapt_check.setToolTip(
            "Train an adapter on each scan (with the do-no-harm gate) instead of using the adapter chosen above; "
            "each accepted adapter is kept in the masks folder, under adapters/"
        )
        self.run_button = QPushButton("Run batch")
        self.progress = _progress_bar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow("scans", _row(self.input_edit, self.input_button))
        form.addRow("masks to", _row(self.output_edit, self.output_button))
        form.addRow(self.adapt_check)
        form.addRow(self.run_button)
        form.addRow(self.progress)
        form.addRow(self.status)
        self.input_button.clicked.connect(lambda: self._choose(self.input_edit, "Folder of scans"))
        self.output_button.clicked.connect(lambda: self._choose(self.output_edit, "Folder for the masks"))
        self.run_button.clicked.connect(self.run_or_cancel)

    def _choose(self, edit: QLineEdit, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, edit.text())
        if folder:
            edit.setText(folder)
            if edit is self.input_edit and not self.output_edit.text():
                self.output_edit.setText(f"{folder.rstrip('/')}_masks")

    @property
    def running(self) -> bool:
        return self.process is not None

    def run_or_cancel(self) -> None:
        if self.running:
            self.cancel()
        else:
            self.run()

    def run(self) -> None:
        """Check the folders here (a clear message at once), then start the command."""
        try:
            command, outdir, todo, before = self._plan()
        except InputError as exc:
            show_error(f"napari-convlora: {exc}")
            return
        if todo == 0:
            show_info(f"napari-convlora: every scan is already done in {outdir} (see {outdir / RESULTS_CSV})")
            return
        self._outdir, self._todo, self._rows_before = outdir, todo, before
        self._stdout = self._stderr = b""
        self._cancelled = False
        process = QProcess(self)
        process.setProgram(sys.executable)
        process.setArguments(command)
        process.readyReadStandardOutput.connect(lambda: self._read(process, err=False))
        process.readyReadStandardError.connect(lambda: self._read(process, err=True))
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._failed_to_start)
        self.process = process
        self.progress.setRange(0, todo)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.run_button.setText("Cancel batch")
        self.status.setText(f"starting: {todo} scan(s) to do")
        process.start()
        self._timer.start()

    def _plan(self) -> tuple[list[str], Path, int, int]:
        text = self.input_edit.text().strip()
        if not text:
            raise InputError("choose a folder of scans for the batch first")
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder (batch scans)")
        out_text = self.output_edit.text().strip()
        if not out_text:
            raise InputError("choose a folder for the batch's masks first")
        outdir = Path(out_text).expanduser().resolve()
        if outdir.exists() and not outdir.is_dir():
            raise InputError(f"{outdir}: is a file; give a folder for the masks")
        adapter, device, model, tta, standardize = self._options()
        adapter = "adapt" if self.adapt_check.isChecked() else adapter
        check_standardize(standardize, adapter)
        scans = plan_scans(str(folder), outdir, adapter)
        table = ResultsTable(outdir)
        taken = table.foreign_outputs(scans)  # the command refuses these too; say it in the GUI's words
        if taken:
            raise InputError(f"{taken[0]}: already exists, not written by a batch run; choose another masks folder")
        todo = len(table.todo(scans))
        command = ["-m", "napari_convlora.cli", "batch", str(folder), "-o", str(outdir)]
        command += ["--adapter", adapter, "--device", device, "--tta", str(tta), "--standardize", standardize]
        command.append("--json")
        if model is not None:
            command += ["--model", str(model)]
        return command, outdir, todo, _row_count(outdir / RESULTS_CSV)

    def _read(self, process: QProcess, err: bool) -> None:
        if err:
            self._stderr += bytes(process.readAllStandardError())
        else:
            self._stdout += bytes(process.readAllStandardOutput())

    def _poll(self) -> None:
        if self._outdir is None:
            return
        done = max(_row_count(self._outdir / RESULTS_CSV) - self._rows_before, 0)
        self.progress.setValue(min(done, self._todo))
        self.status.setText(f"{done} of {self._todo} scan(s) done; results in {self._outdir / RESULTS_CSV}")

    def cancel(self) -> None:
        """Ask the command to stop (SIGINT: it closes its cluster); kill it after ``STOP_WAIT_S``."""
        if self.process is None:
            return
        self._cancelled = True
        self.run_button.setEnabled(False)
        self.status.setText("cancelling: the finished scans are kept; run the same folder again to resume")
        pid = int(self.process.processId())
        if os.name == "posix" and pid > 0:
            os.kill(pid, signal.SIGINT)
        else:
            self.process.terminate()
        self._kill_timer.start(int(STOP_WAIT_S * 1000))

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self, wait_s: float = 0.0) -> None:
        """The viewer is closing: stop the command, waiting up to ``wait_s`` before killing it."""
        if self.process is None:
            return
        process = self.process
        self.cancel()
        if wait_s > 0 and not process.waitForFinished(int(wait_s * 1000)):
            process.kill()
            process.waitForFinished(2000)

    def _failed_to_start(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            show_error(f"napari-convlora: the batch command could not start ({sys.executable})")
            self._reset("could not start")

    def _finished(self, exit_code: int, _status=None) -> None:
        self._poll()
        outdir = self._outdir
        summary = _last_json(self._stdout)
        message = _last_line(self._stderr)
        if self._cancelled:
            show_info(f"napari-convlora: batch cancelled; the finished scans are in {outdir}")
            self._reset("cancelled")
        elif exit_code == 0 and summary is not None:
            show_info(f"napari-convlora: batch done, {summary['ok']} scan(s) segmented into {outdir}")
            self._reset(f"done: {summary['ok']} ok in {summary['seconds']:.0f} s; results in {summary['results_csv']}")
        elif exit_code == 2 and summary is not None:
            show_warning(
                f"napari-convlora: batch done, but {summary['failed']} of {summary['ran']} scan(s) failed; "
                f"see {summary['results_csv']}"
            )
            self._reset(f"{summary['failed']} failed, {summary['ok']} ok; results in {summary['results_csv']}")
        else:
            show_error(f"napari-convlora: batch failed: {message or f'exit status {exit_code}'}")
            self._reset(f"failed: {message}")

    def _reset(self, status: str) -> None:
        self._timer.stop()
        self._kill_timer.stop()
        if self.process is not None:
            self.process.deleteLater()
        self.process = None
        self.progress.setVisible(False)
        self.run_button.setText("Run batch")
        self.run_button.setEnabled(True)
        self.status.setText(status)


def _row_count(path: Path) -> int:
    """Rows of a results table (its header not counted); 0 if there is none yet."""
    try:
        with path.open("rb") as handle:
            return max(sum(1 for line in handle if line.strip()) - 1, 0)
    except FileNotFoundError:
        return 0


def _last_json(text: bytes) -> dict | None:
    for line in reversed(text.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _last_line(text: bytes) -> str:
    lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else ""
