"""GUI responsiveness and click-to-mask times of the napari widget, in a real napari window.

Usage (needs a display; on a headless machine run it under Xvfb):
    xvfb-run -a python scripts/bench_gui.py [--worker process|thread] [--threads N] [--model WEIGHTS]
                                            [--cli] [--screenshots docs/]

Opens napari with the widget docked and the sample as a simulated Philips 3 T
scan with its reference mask (File > Open Sample), then, as a user would, clicks
Segment (source model), waits for the mask, clicks Adapt (the defaults: since
2026-12-06 the intensity map, before that 10 slices and 5 epochs of ConvLoRA),
waits for the adapted mask, and clicks Segment once more (the
widget refreshes its layers; phases of that step are named "(again)"). All the
while a QTimer fires every 10 ms on the GUI thread and records how late each
tick is: the worst delay is how long the viewer was frozen. ``--worker`` chooses where the model runs: the
widget's worker process (the default) or threads of the viewer's process (the
fallback). ``--threads`` sets torch's intra-op threads there (default: every
core in the process, all but one in threads). With ``--cli`` the same scan is
then segmented and adapted by ``convlora segment`` / ``convlora adapt`` in
fresh processes, timed whole, to compare with the click-to-mask times. Prints
one JSON object. With ``--screenshots`` also saves the window after each stage
(PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch  # imported up front, as the widget's job module does
from qtpy.QtCore import QEventLoop, QTimer

from napari_convlora._napari import jobs
from napari_convlora._napari.launch import open_viewer
from napari_convlora._napari.sample import twin
from napari_convlora.library import default_model_path
from napari_convlora.nifti import save_volume

TICK_MS = 10


class TickRecorder:
    """How late each tick of a 10 ms QTimer on the GUI thread is, and what was going on meanwhile.

    A late tick is charged to "napari adds the result layers" when the gap overlaps one of the
    widget's result handlers (they run on the GUI thread and create layers), else to what the
    widget was doing when the gap began: adaptation training, segmentation or metrics in a
    worker thread, or nothing. Python's cyclic garbage collections on the GUI thread are timed
    too (``gc.callbacks``): how much of each phase's worst delay was a collection.
    """

    def __init__(self, widget) -> None:
        self.widget = widget
        self.gaps: list[tuple[float, float, str]] = []  # (start, end, state at start)
        self.handlers: list[tuple[float, float]] = []
        self.handler_ms: dict[str, float] = {}  # slowest run of each result handler
        self.collections: list[tuple[float, float, int]] = []  # (start, end, generation) on the GUI thread
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._last = time.perf_counter()
        self._state = self.state()
        self.tag = ""  # appended to every phase name from now on (e.g. " (again)" for the repeated Segment)
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        for name in ("_on_segmented", "_on_adapted", "_on_metrics", "_on_finished"):
            setattr(widget, name, self._timed(getattr(widget, name), name))

    def _timed(self, handler, name: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return handler(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.handlers.append((start, end))
                self.handler_ms[name] = round(max(self.handler_ms.get(name, 0.0), (end - start) * 1000), 1)

        return run

    def _gc(self, phase: str, info: dict) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        now = time.perf_counter()
        if phase == "start":
            self._gc_started = now
        else:
            self.collections.append((self._gc_started, now, info["generation"]))

    def gc_ms(self, start: float, end: float) -> float:
        """Milliseconds of garbage collection on the GUI thread between ``start`` and ``end``."""
        return sum(max(0.0, min(end, c1) - max(start, c0)) for c0, c1, _ in self.collections) * 1000

    def state(self) -> str:
        jobs_running = self.widget.jobs
        if "adapt" in jobs_running:
            return "adaptation training (worker)"
        if "segment" in jobs_running:
            return "segmentation (worker)"
        if "metrics" in jobs_running:
            return "metrics (worker)"
        return "idle"

    def start(self) -> None:
        self._last = time.perf_counter()
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append((self._last, now, self._state + self.tag))
        self._last, self._state = now, self.state()

    def summary(self) -> dict[str, dict[str, float]]:
        groups: dict[str, list[tuple[float, float, float]]] = {}
        for start, end, state in self.gaps:
            in_handler = any(h0 < end and h1 > start for h0, h1 in self.handlers)
            tag = state[state.index(" (again)") :] if " (again)" in state else ""
            key = f"napari adds the result layers (GUI thread){tag}" if in_handler else state
            groups.setdefault(key, []).append(((end - start) * 1000 - TICK_MS, start, end))
        out = {}
        for key, gaps in groups.items():
            d = sorted(delay for delay, _, _ in gaps)
            _, worst_start, worst_end = max(gaps)
            out[key] = {
                "ticks": len(d),
                "worst_delay_ms": round(d[-1], 1),
                "gc_in_worst_delay_ms": round(self.gc_ms(worst_start, worst_end), 1),
                "p99_delay_ms": round(d[min(len(d) - 1, int(0.99 * len(d)))], 1),
                "median_delay_ms": round(statistics.median(d), 1),
            }
        return out

    def gc_summary(self) -> dict[str, float]:
        """How many collections ran on the GUI thread while recording, and the longest one per generation."""
        longest = {f"gen{g}": 0.0 for g in range(3)}
        for start, end, generation in self.collections:
            longest[f"gen{generation}"] = max(longest[f"gen{generation}"], round((end - start) * 1000, 1))
        return {"collections": len(self.collections), "longest_ms": longest}


def wait_until(condition, timeout_s: float) -> None:
    """Run the Qt event loop (as napari.run would) until ``condition()`` holds, checked every 20 ms.

    A real event loop, not a processEvents() spin: a spin keeps the GUI process on a
    core at 100% and takes it from the model.
    """
    if condition():
        return
    loop, deadline, late = QEventLoop(), time.perf_counter() + timeout_s, []

    def check() -> None:
        if condition():
            loop.quit()
        elif time.perf_counter() > deadline:
            late.append(True)
            loop.quit()

    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(check)
    timer.start()
    loop.exec()
    timer.stop()
    if late:
        raise TimeoutError("the widget did not finish in time")


def settle(seconds: float) -> None:
    wait_until(lambda end=time.perf_counter() + seconds: time.perf_counter() > end, seconds + 5)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of this process, or of process ``pid`` (Linux /proc)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the viewer's process and by the worker process between marks, per phase."""

    def __init__(self, worker_pid: int | None) -> None:
        self.pid = worker_pid
        self.phases: dict[str, dict[str, float]] = {}
        self._mark = self._now()

    def _now(self) -> tuple[float, float, float]:
        worker = cpu_seconds(self.pid) if self.pid is not None else 0.0
        return time.perf_counter(), cpu_seconds(), worker

    def phase(self, name: str) -> None:
        now = self._now()
        wall, gui, worker = (b - a for a, b in zip(self._mark, now, strict=True))
        self.phases[name] = {"wall_s": round(wall, 1), "viewer_cpu_s": round(gui, 1), "worker_cpu_s": round(worker, 1)}
        self._mark = now


def cli_times(model: Path | None, folder: Path) -> dict[str, float]:
    """Whole-process seconds of ``convlora segment`` and ``convlora adapt`` (the widget's defaults) on the sample."""
    scan, _ = twin()
    image = save_volume(scan, folder / "sample.nii.gz")
    model_args = ["--model", str(model or default_model_path())]
    commands = {
        "segment": ["segment", str(image), "-o", str(folder / "mask.nii.gz"), *model_args, "--device", "cpu"],
        "adapt": ["adapt", str(image), "-o", str(folder / "cli.safetensors"), *model_args, "--device", "cpu"],
    }
    times = {}
    for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "napari_convlora.cli", *command], check=True, capture_output=True)
        times[name] = round(time.perf_counter() - start, 1)
    return times


def main() -> None:
    """Parse the options, run the benchmark, and print its JSON alone on stdout."""
    with contextlib.redirect_stdout(sys.stderr):  # napari echoes notifications on stdout; keep it for the JSON
        result = run()
    print(json.dumps(result, indent=1))


def run() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("process", "thread"), default="process", help="where the model runs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for the model (default: see above)")
    parser.add_argument("--cli", action="store_true", help="also time convlora segment / adapt on the same scan")
    parser.add_argument("--model", type=Path, help="base model (default: the shipped source model)")
    parser.add_argument("--screenshots", type=Path, help="folder for PNG screenshots of the window")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    os.environ.setdefault("CONVLORA_HOME", tempfile.mkdtemp(prefix="convlora-bench-"))
    if args.threads is not None:
        os.environ[jobs.THREADS_ENV] = str(args.threads)
    os.environ["CONVLORA_WORKER"] = args.worker

    viewer, widget = open_viewer(sample=True, model=args.model)
    if widget.process is not None and not widget.process.wait_ready():
        raise SystemExit(f"no worker process: {widget.process.failure}")
    viewer.window._qt_window.resize(1500, 1000)
    widget.controls.errors_check.setChecked(True)
    widget.controls.name_edit.setText("philips-3t-sim")
    recorder = TickRecorder(widget)
    settle(2.0)
    recorder.start()
    meter = CpuMeter(widget.process.pid if widget.process is not None else None)
    settle(3.0)
    meter.phase("idle")

    def shot(name: str) -> None:
        if args.screenshots is not None:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(args.screenshots / name), canvas_only=False)

    widget.controls.segment_button.click()
    wait_until(lambda: not widget.jobs, args.timeout)
    meter.phase("segment and metrics")
    shot("gui_segment.png")

    widget.controls.adapt_button.click()
    plotted = widget.controls.train_plot.series  # ConvLoRA plots its loss, the intensity objective its curve's distance
    wait_until(lambda: "adapt" in widget.jobs and ("loss" in plotted or "distance" in plotted), args.timeout)
    shot("gui_adapting.png")
    wait_until(lambda: not widget.jobs and "adapt" in widget.timings, args.timeout)
    accepted = any(layer.name.startswith("mask") and layer.name != "mask: source" for layer in viewer.layers)
    wait_until(lambda: widget.last_metrics is not None and len(widget.last_metrics.rows) >= 1 + accepted, args.timeout)
    meter.phase("adapt (and metrics)")
    # Segment again, as a user checking a result would: the widget refreshes its own layers instead of adding
    first = dict(widget.timings)  # the second Segment overwrites the widget's own timing
    recorder.tag = " (again)"
    clicked_again = time.perf_counter()
    widget.controls.segment_button.click()
    wait_until(lambda: not widget.jobs, args.timeout)  # the segment job, then the metrics job it starts
    again_s = time.perf_counter() - clicked_again
    recorder.tag = ""
    settle(1.0)
    if widget.adapter_slices:
        widget.jump_to_slice(*widget.adapter_slices[len(widget.adapter_slices) // 2])
    settle(1.0)
    shot("gui_adapted.png")
    if args.screenshots is not None:  # the whole form, metrics included, beyond the dock's scroll area
        widget.controls.grab().save(str(args.screenshots / "gui_widget.png"))

    rows = widget.last_metrics.rows if widget.last_metrics is not None else {}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "device": widget.controls.device_note.text(),
        "worker": args.worker if widget.process is None or widget.process.failure is None else "thread (fallback)",
        "worker_torch_threads": int(os.environ.get(jobs.THREADS_ENV, 0))
        or (os.cpu_count() if args.worker == "process" else jobs.worker_threads()),
        "image": widget.controls.image_combo.currentText(),
        "segment_click_to_mask_s": round(first["segment"], 1),
        "segment_again_click_to_metrics_s": round(again_s, 2),
        "adapt_accepted_by_gate": accepted,
        "adapt_click_to_mask_s": round(first["adapt"], 1),  # to the verdict when the gate refused
        "adapt_status": widget.controls.adapt_status.text(),
        "event_loop": recorder.summary(),
        "slowest_result_handler_ms": recorder.handler_ms,
        "garbage_collection": recorder.gc_summary(),
        "cpu_per_phase": meter.phases,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "metrics": {
            name: {k: round(v, 4) for k, v in figures.items() if k in ("dice", "surface_dice", "hd95_mm")}
            for name, figures in rows.items()
        },
    }
    recorder.timer.stop()
    viewer.close()
    if args.cli:
        with tempfile.TemporaryDirectory() as folder:
            cli = cli_times(args.model, Path(folder))
        result["cli_s"] = cli
        result["gui_over_cli"] = {k: round(first[k] / cli[k], 2) for k in cli}
    return result


if __name__ == "__main__":
    main()
