"""A whole volume to a brain mask on the input's voxel grid, with or without an adapter.

:func:`iter_segment` is a generator (progress reports, then the result) so the
GUI can show progress and cancel between batches; :func:`segment` runs it to
the end for scripts and the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.special import expit

from .adapters import Adapter, apply_adapter
from .device import pick_device
from .geometry import SliceGeometry, plan
from .model import BaseModel, UNet2D
from .nifti import Volume


@dataclass(frozen=True)
class SegmentProgress:
    done: int
    total: int
    elapsed_s: float


@dataclass
class Segmentation:
    """The result: a 0/1 uint8 mask in the input file's voxel order, and how it was made."""

    mask: np.ndarray
    probability: np.ndarray
    adapter: str
    seconds: float
    voxel_volume_ml: float

    @property
    def volume_ml(self) -> float:
        return float(np.count_nonzero(self.mask)) * self.voxel_volume_ml


def predict_logits(
    unet: UNet2D, stack: np.ndarray, device: torch.device, batch_size: int = 16
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, logits) for consecutive batches of a (N, H, W) slice stack."""
    unet = unet.to(device).eval()
    if device.type == "cpu":
        unet = unet.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for start in range(0, len(stack), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(stack[start : start + batch_size, None])).to(device)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            yield start, unet(x)[:, 0].float().cpu().numpy()


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component and fill its holes (a brain is one solid piece)."""
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


def iter_segment(
    base: BaseModel,
    volume: Volume,
    adapter: Adapter | None = None,
    device: str = "auto",
    batch_size: int = 16,
    cleanup: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[SegmentProgress | Segmentation | None]:
    """Yield :class:`SegmentProgress` per batch, then the :class:`Segmentation` (or None if stopped)."""
    start = time.perf_counter()
    torch_device = pick_device(device)
    unet = apply_adapter(base, adapter)  # a copy: the base model is never touched
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    logits = np.empty_like(stack)
    for first, batch in predict_logits(unet, stack, torch_device, batch_size):
        logits[first : first + len(batch)] = batch
        done = first + len(batch)
        yield SegmentProgress(done, len(stack), time.perf_counter() - start)
        if should_stop is not None and should_stop():
            yield None
            return
    yield _finish(geometry, logits, volume, adapter, cleanup, start)


def _finish(
    geometry: SliceGeometry, logits: np.ndarray, volume: Volume, adapter: Adapter | None, cleanup: bool, start: float
) -> Segmentation:
    probability = geometry.from_model(expit(logits))
    mask = (probability > 0.5).astype(np.uint8)
    if cleanup and mask.any():
        mask = clean_mask(mask)
    return Segmentation(
        mask=mask,
        probability=probability,
        adapter=adapter.name if adapter is not None else "none",
        seconds=time.perf_counter() - start,
        voxel_volume_ml=float(np.prod(volume.spacing)) / 1000.0,
    )


def segment(base: BaseModel, volume: Volume, adapter: Adapter | None = None, **kwargs) -> Segmentation:
    """Run :func:`iter_segment` to the end and return its result."""
    result = None
    for report in iter_segment(base, volume, adapter, **kwargs):
        result = report
    assert isinstance(result, Segmentation)
    return result
