"""The paper's argument in figures: adapter size, switch time, and adapted inference at the source model's speed.

Usage: python scripts/bench_adapters.py [--model resources/source_model.safetensors]
           [--adapters resources/adapters] [--volume resources/sample/colin27_t1.nii.gz] [--repeats 3]
Prints, for the model and every adapter file in the folder:
- size on disk of each adapter and of the model (a full fine-tuned copy is the model's size) and trainable parameters;
- switch time: reading an adapter file and applying it to the already loaded base model (what the widget
  and ``--adapter`` do; the base model is never reloaded), median of the repeats;
- whole-stack inference time, source model vs the adapter merged into the weights vs unmerged;
- how far merged and unmerged predictions differ (max |logit| difference, voxels whose mask differs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_convlora.adapters import apply_adapter, load_adapter
from napari_convlora.device import pick_device
from napari_convlora.geometry import plan
from napari_convlora.inference import predict_logits
from napari_convlora.library import ADAPTER_SUFFIX, BUILTIN_ADAPTERS, SOURCE_MODEL
from napari_convlora.model import count_parameters, load_model
from napari_convlora.nifti import load_volume

ROOT = Path(__file__).resolve().parent.parent


def logits(unet: torch.nn.Module, stack: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits of the whole stack and the seconds they took."""
    start = time.perf_counter()
    out = np.concatenate([b for _, b in predict_logits(unet, stack, pick_device("cpu"))])
    return out, time.perf_counter() - start


def timed(unet: torch.nn.Module, stack: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """Logits of a first (warm-up) pass, and the median seconds of ``repeats`` passes after it."""
    out, _ = logits(unet, stack)
    return out, statistics.median(logits(unet, stack)[1] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SOURCE_MODEL)
    parser.add_argument("--adapters", type=Path, default=BUILTIN_ADAPTERS)
    parser.add_argument("--volume", type=Path, default=ROOT / "resources" / "sample" / "colin27_t1.nii.gz")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base, volume = load_model(args.model), load_volume(args.volume)
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    model_bytes = args.model.stat().st_size
    print(
        f"model {args.model.name}: {model_bytes / 1e6:.2f} MB on disk, U-Net {count_parameters(base.unet):,} "
        f"parameters; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{stack.shape[0]} slices of {stack.shape[1]}x{stack.shape[2]}"
    )
    _, source_s = timed(base.copy().unet, stack, args.repeats)
    print(f"  source model: whole stack {source_s:.2f} s ({source_s / len(stack) * 1000:.1f} ms/slice)")
    for path in sorted(args.adapters.glob(f"*{ADAPTER_SUFFIX}")):
        switch = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            adapter = load_adapter(path)
            merged = apply_adapter(base, adapter, merge=True)
            switch.append(time.perf_counter() - start)
        unmerged = apply_adapter(base, adapter, merge=False)
        merged_out, merged_s = timed(merged, stack, args.repeats)
        unmerged_out, unmerged_s = timed(unmerged, stack, args.repeats)
        size = path.stat().st_size
        print(
            f"  {path.stem} ({adapter.metadata.get('kind')}): {size / 1e3:.0f} kB "
            f"({size / model_bytes:.1%} of the model), {adapter.trainable_parameters:,} trainable parameters; "
            f"switch {statistics.median(switch) * 1000:.0f} ms; "
            f"stack merged {merged_s:.2f} s ({merged_s / source_s:.2f}x source), unmerged {unmerged_s:.2f} s; "
            f"merged vs unmerged max |logit diff| {np.abs(merged_out - unmerged_out).max():.2e}, "
            f"{int(((merged_out > 0) != (unmerged_out > 0)).sum())} of {merged_out.size:,} pixels differ"
        )


if __name__ == "__main__":
    main()
