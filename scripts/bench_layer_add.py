"""Where the GUI thread's time goes when napari adds a result layer (the one stall scripts/bench_gui.py still finds).

Usage (needs a display; on a headless machine run it under Xvfb):
    xvfb-run -a -s "-screen 0 1600x1100x24" python scripts/bench_layer_add.py [--trials 8]

A napari window like the widget's (1500x1000, a 181x217x181 image and a mask
layer already there, the first-use costs paid as the widget pays them), then
a Labels layer of the image's size is added and removed again, ``--trials``
times each way: as the widget adds it (napari selects the new layer) and without
selecting it. A 10 ms QTimer on the GUI thread measures the worst stall around
each add; napari's own steps are timed by wrapping them: the vispy layer and
its overlays (``QtViewer._add_layer``), the layer controls widget
(``QtLayerControlsContainer._add``) and the canvas draws. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import napari
import numpy as np
from napari._qt import qt_viewer
from napari._qt.layer_controls import qt_layer_controls_container
from napari._vispy import canvas
from qtpy.QtCore import QEventLoop, QTimer

STEPS = {
    "vispy layer and overlays": (qt_viewer.QtViewer, "_add_layer"),
    "layer controls widget": (qt_layer_controls_container.QtLayerControlsContainer, "_add"),
    "canvas draws": (canvas.VispyCanvas, "on_draw"),
}


class Stopwatch:
    """Per-step milliseconds of napari's methods while armed, and the worst gap between ticks of a 10 ms timer."""

    def __init__(self) -> None:
        self.step_ms: dict[str, float] = {}
        self.ticks: list[float] = []
        for name, (cls, method) in STEPS.items():
            setattr(cls, method, self._wrap(name, getattr(cls, method)))
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start()

    def _wrap(self, name: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.step_ms[name] = self.step_ms.get(name, 0.0) + (time.perf_counter() - start) * 1000

        return timed

    def measure(self, action) -> dict[str, float]:
        run_loop(0.4)
        self.step_ms.clear()
        self.ticks = [time.perf_counter()]
        start = time.perf_counter()
        action()
        call_ms = (time.perf_counter() - start) * 1000
        run_loop(0.5)
        worst = max(b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False)) * 1000 - 10
        return {"add_call_ms": call_ms, "worst_stall_ms": worst, **{k: v for k, v in self.step_ms.items()}}


def run_loop(seconds: float) -> None:
    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1500, 1000)
    image = np.random.default_rng(0).random((181, 217, 181), dtype=np.float32)
    viewer.add_image(image, name="scan")
    mask = (image > 0.5).astype(np.uint8)
    viewer.add_labels(mask, name="mask: source", opacity=0.45)
    for _ in range(2):  # the widget's warm-up: the first Labels layers of a session cost more
        viewer.layers.remove(viewer.add_labels(np.zeros((1, 1, 1), np.uint8), visible=False))
    watch = Stopwatch()

    def add(select: bool) -> None:
        viewer.layers._activate_on_insert = select  # napari selects a new layer unless told not to
        try:
            viewer.add_labels(mask, name="new", opacity=0.45)
        finally:
            viewer.layers._activate_on_insert = True

    runs: dict[str, list[dict[str, float]]] = {"selected (as the widget adds it)": [], "not selected": []}
    for trial in range(args.trials):  # alternate the order so a slow spell hits both
        for key in list(runs)[:: 1 if trial % 2 else -1]:
            runs[key].append(watch.measure(lambda key=key: add(key.startswith("selected"))))
            viewer.layers.remove("new")
    watch.timer.stop()
    viewer.close()
    names = ("add_call_ms", "worst_stall_ms", *STEPS)
    summary = {
        key: {name: round(statistics.median(r.get(name, 0.0) for r in rows), 1) for name in names}
        | {"worst_stall_ms_all": [round(r["worst_stall_ms"]) for r in rows]}
        for key, rows in runs.items()
    }
    print(json.dumps({"napari": napari.__version__, "trials": args.trials, "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
