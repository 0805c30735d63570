"""Probe: does the adaptation worker starve another Python thread (the GUI thread in napari)?

Runs `adapt` (shipped model, the sample under the simulated philips-3t profile,
2 epochs, 1 torch thread) in a background thread while the main thread sleeps
10 ms at a time, and prints every wake-up later than 50 ms with the last report
the worker had yielded ("start" = before the first step). No Qt needed: a GIL
held by the worker delays any Python thread the same way.

Usage: python scripts/probe_worker_gil.py
"""

import threading
import time

import torch

from napari_convlora.adapt import AdaptConfig, adapt
from napari_convlora.library import SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.nifti import load_volume
from napari_convlora.simulate import simulate

torch.set_num_threads(1)
base = load_model(SOURCE_MODEL)
scan, _ = simulate(load_volume("resources/sample/colin27_t1.nii.gz"), None, "philips-3t", 0)
phase, finished = ["start"], threading.Event()


def work() -> None:
    for report in adapt(base, scan, AdaptConfig(device="cpu", epochs=2)):
        phase[0] = f"{type(report).__name__} {getattr(report, 'step', getattr(report, 'epoch', ''))}"
    finished.set()


threading.Thread(target=work).start()
late = []
while not finished.is_set():
    before = time.perf_counter()
    time.sleep(0.01)
    delay_ms = (time.perf_counter() - before - 0.01) * 1000
    if delay_ms > 50:
        late.append((round(delay_ms), phase[0]))
print("wake-ups later than 50 ms (ms, worker phase):", late)
