"""Time whole-volume segmentation and adaptation (ConvLoRA and MoE adapters) with a model on this machine.

Usage: python scripts/bench_inference.py [--model resources/source_model.safetensors] [--volume ...] [--repeats 3]
                                         [--kinds convlora moe] [--phases]
Prints: per-slice inference time in float32 and bfloat16 at batch 16 and 4 (channels_last, as
`segment` runs it), whole-volume `segment` time in float32 and as `segment` picks it (auto),
and for each adapter kind the time of one default adaptation (10 slices x 5 epochs), then
per-slice and whole-volume inference with that adapter as `segment` runs it (ConvLoRA merged,
MoE unmerged: it cannot be merged).
With ``--phases`` it prints instead the median time of each step of ``segment`` outside the
network (planning, back to the file's grid, clean-up) and of scipy.ndimage's morphology
beside :mod:`napari_convlora.morphology` on this scan's own masks (the results are equal).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_convlora import morphology
from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.adapters import ADAPTER_KINDS, apply_adapter
from napari_convlora.geometry import plan
from napari_convlora.inference import bf16_supported, clean_mask, predict_logits, segment
from napari_convlora.model import fold_batch_norms, load_model
from napari_convlora.nifti import load_volume

ROOT = Path(__file__).resolve().parent.parent


def per_slice_ms(unet: torch.nn.Module, stack: np.ndarray, batch: int, precision: str, n: int = 32) -> float:
    """Milliseconds per slice of ``predict_logits`` (what ``segment`` runs: channels_last on the CPU)."""
    part = stack[:n]
    for _ in predict_logits(unet, part[:batch], torch.device("cpu"), batch, precision):  # warm-up
        pass
    start = time.perf_counter()
    for _ in predict_logits(unet, part, torch.device("cpu"), batch, precision):
        pass
    return (time.perf_counter() - start) / len(part) * 1000


def median_ms(function, repeats: int) -> float:
    """Median wall milliseconds of ``function()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def phases(base, volume, repeats: int) -> None:
    """Time the steps of ``segment`` around the network, and scipy's morphology against ours on this scan."""
    geometry, scaled = plan(volume, base.intensity_scaling)
    mask = segment(base, volume, device="cpu", cleanup=False).mask
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    part = mask[box].astype(bool)
    steps = {
        "plan (reorient, scale, find the head)": lambda: plan(volume, base.intensity_scaling),
        "back to the file's grid (from_model)": lambda: geometry.from_model(geometry.to_model(scaled)),
        "clean-up (clean_mask)": lambda: clean_mask(mask),
        "opening x2: scipy": lambda: ndimage.binary_opening(part, iterations=2),
        "opening x2: ours": lambda: morphology.opening(part, 2),
        "cube dilation x2: scipy": lambda: ndimage.binary_dilation(part, np.ones((3, 3, 3), bool), iterations=2),
        "cube dilation x2: ours": lambda: morphology.dilate_cube(part, 2),
        "fill holes: scipy": lambda: ndimage.binary_fill_holes(part),
        "fill holes: ours": lambda: morphology.fill_holes(part),
    }
    for name, function in steps.items():
        print(f"  {name}: {median_ms(function, repeats):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "resources" / "source_model.safetensors")
    parser.add_argument("--volume", type=Path, default=ROOT / "resources" / "sample" / "colin27_t1.nii.gz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", choices=ADAPTER_KINDS, default=list(ADAPTER_KINDS))
    parser.add_argument("--phases", action="store_true", help="time the steps around the network instead")
    args = parser.parse_args()
    base, volume = load_model(args.model), load_volume(args.volume)
    width = base.metadata["architecture"]["base_width"]
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    print(
        f"model width {width}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"volume {volume.data.shape} -> {stack.shape[0]} slices of {stack.shape[1]}x{stack.shape[2]}"
    )
    print(f"  this CPU computes bfloat16 natively: {bf16_supported()}")
    if args.phases:
        phases(base, volume, max(args.repeats, 5))
        return
    folded = fold_batch_norms(base.copy().unet)  # as segment runs it
    for batch, precision in ((16, "float32"), (4, "float32"), (16, "bfloat16"), (4, "bfloat16")):
        ms = statistics.median(per_slice_ms(folded, stack, batch, precision) for _ in range(args.repeats))
        print(f"  inference, batch {batch:2d}, {precision:8s}, channels_last: {ms:6.1f} ms/slice")
    for precision in ("float32", "auto"):
        seconds = statistics.median(
            segment(base, volume, device="cpu", precision=precision).seconds for _ in range(args.repeats)
        )
        print(f"  segment, precision {precision} (whole volume, incl. resampling and clean-up): {seconds:.1f} s")
    for kind in args.kinds:
        done = run_adaptation(base, volume, AdaptConfig(device="cpu", kind=kind))
        print(
            f"  {kind}: adapt, 10 slices x 5 epochs, batch 2: {done.seconds:.1f} s, best epoch {done.best_epoch}, "
            f"agreements {[round(a, 4) for a in done.agreements]}"
        )
        adapted = fold_batch_norms(apply_adapter(base, done.adapter))
        ms = statistics.median(per_slice_ms(adapted, stack, 4, "auto") for _ in range(args.repeats))
        seconds = statistics.median(
            segment(base, volume, done.adapter, device="cpu").seconds for _ in range(args.repeats)
        )
        print(f"  {kind}: with the adapter, as segment runs it: {ms:6.1f} ms/slice; segment {seconds:.1f} s")


if __name__ == "__main__":
    main()
