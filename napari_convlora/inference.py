"""A whole volume to a brain mask on the input's voxel grid, with or without an adapter.

:func:`iter_segment` is a generator (progress reports, then the result) so the
GUI can show progress and cancel between batches; :func:`segment` runs it to
the end for scripts and the CLI.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.special import expit

from .adapters import Adapter, apply_adapter
from .device import pick_device
from .errors import InputError
from .geometry import SliceGeometry, plan
from .intensity_map import IntensityCurve
from .model import BaseModel, UNet2D, fold_batch_norms
from .morphology import dilate_cube, fill_holes, largest_component, opening
from .nifti import Volume
from .standardize import IntensityReference

COARSE_X_STEP = 3  # the first pass of two reads every third sagittal slice
BRAIN_MARGIN_MM = 12.0  # around the brain the first pass found
# Gaussian sigma (mm) on the probability before the threshold: slices predicted one by one disagree a
# little, and the mean over a few mm places the surface better (held-out heads: BENCHMARKS.md section 1)
SMOOTH_MM = 2.0
PRECISIONS = ("auto", "float32", "bfloat16")
# Test-time augmentation: the in-plane axes (rows, columns of a slice) mirrored in each view, for 1, 2 or 4 views.
# The network was trained with both mirrors, so each view is a fair guess; their mean probability places the
# boundary better (held-out heads: BENCHMARKS.md section 1).
TTA_MIRRORS = {1: ((),), 2: ((), (2,)), 4: ((), (2,), (3,), (2, 3))}


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


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass: 4 on a CPU, where a small batch stays in cache (measured faster), else 16."""
    return 4 if device.type == "cpu" else 16


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the network computes in for inference.

    ``auto`` is bfloat16 on a CPU that computes it natively (about twice as fast
    as float32 there; masks measured in BENCHMARKS.md section 4) and float32
    everywhere else; ``float32`` / ``bfloat16`` force one. Training and
    adaptation always run in float32.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and bf16_supported() else torch.float32


def check_tta(tta: int) -> int:
    if tta not in TTA_MIRRORS:
        raise InputError(f"test-time views must be one of {', '.join(map(str, TTA_MIRRORS))}, not {tta!r}")
    return tta


def cpu_streams(device: torch.device, batches: int) -> int:
    """Forward passes run at once: 2 on a CPU with 2 or more torch threads (and 2 batches), else 1.

    An 8-wide U-Net's convolutions are small: torch's threads spend much of a
    pass waiting on each other. Two batches at once, each on half the threads,
    keep the cores busy (144 slices on 2 cores: 3.1 s on two threads against
    2.2 s as two single-threaded streams; BENCHMARKS.md section 4).
    """
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 and batches >= 2 else 1


def predict_logits(
    unet: UNet2D,
    stack: np.ndarray,
    device: torch.device,
    batch_size: int | None = None,
    precision: str = "auto",
    tta: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, float32 logits) for consecutive batches of a (N, H, W) slice stack, in order.

    With ``tta`` > 1 each slice is also read mirrored (:data:`TTA_MIRRORS`), in
    the same forward pass, and the logits are those of the views' mean
    probability. On a CPU, :func:`cpu_streams` batches are computed at once.
    """
    unet = unet.to(device).eval()
    batch_size = batch_size or default_batch_size(device)
    dtype = inference_dtype(device, precision)
    mirrors = TTA_MIRRORS[check_tta(tta)]
    if device.type == "cpu":
        unet = unet.to(memory_format=torch.channels_last)

    def forward(start: int) -> tuple[int, np.ndarray]:
        # inference mode and autocast hold per thread: set in the thread that computes
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = torch.from_numpy(np.ascontiguousarray(stack[start : start + batch_size, None])).to(device)
            if len(mirrors) > 1:
                x = torch.cat([x.flip(dims) if dims else x for dims in mirrors])
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            out = unet(x).float()
            if len(mirrors) > 1:
                views = out.chunk(len(mirrors))  # each view mirrored back before the mean
                p = torch.stack([v.flip(d) if d else v for v, d in zip(views, mirrors, strict=True)]).sigmoid().mean(0)
                out = torch.logit(p, eps=1e-6)
            return start, out[:, 0].cpu().numpy()

    starts = range(0, len(stack), batch_size)
    streams = cpu_streams(device, len(starts))
    if streams == 1:
        yield from map(forward, starts)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))  # process-wide: restored when the stack is done or dropped
    try:
        with ThreadPoolExecutor(streams) as pool:
            pending: deque[Future] = deque()
            for start in starts:
                pending.append(pool.submit(forward, start))
                if len(pending) > streams:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)


def clean_mask(mask: np.ndarray, bridge_voxels: int = 2) -> np.ndarray:
    """One solid brain: the largest component once thin bridges are cut, its own boundary kept, holes filled.

    A small opening (``bridge_voxels`` iterations of the 6-neighbourhood) cuts
    the thin strands through which a mask leaks into the neck, eyes or scalp;
    the largest piece left is then grown back by as much, within the mask, so
    the opening does not shave the brain's surface.
    """
    if not mask.any():
        return mask.astype(np.uint8)
    box = _bounding_box(mask, pad=bridge_voxels + 1)
    part = mask[box].astype(bool)
    core = largest_component(opening(part, bridge_voxels)) if bridge_voxels else part
    if not core.any():  # nothing thicker than the bridges: the plain largest component
        core = part
    # back by as much in every direction, corners and edges included
    kept = largest_component(part & dilate_cube(core, bridge_voxels))
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[box] = fill_holes(kept)
    return out


def _bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def brain_box(geometry: SliceGeometry, coarse: np.ndarray, x_step: int) -> tuple[tuple[int, int], ...] | None:
    """Where a first pass over every ``x_step``-th slice found the brain, plus a margin, as a RAS box.

    ``coarse`` holds that pass's probabilities, one slice per ``x_step`` slices
    of ``geometry``'s stack. The brain is the largest 3D component of its mask
    after a small opening, so a strand of false positives down the neck does
    not stretch the box. None when the pass found nothing.
    """
    found = coarse > 0.5
    core = largest_component(opening(found, 1))
    if not core.any():
        core = largest_component(found)
    if not core.any():
        return None
    box = _bounding_box(core)
    lo = [box[0].start * x_step - x_step, box[1].start, box[2].start]
    hi = [(box[0].stop - 1) * x_step + 1 + x_step, box[1].stop, box[2].stop]
    ras_box = geometry.model_to_ras_box(tuple(lo), tuple(hi))
    margins = [int(np.ceil(BRAIN_MARGIN_MM / s)) for s in geometry.ras_spacing]
    return tuple(
        (max(a - m, 0), min(b + m, n)) for (a, b), m, n in zip(ras_box, margins, geometry.ras_shape, strict=True)
    )


def input_reference(base: BaseModel, adapter: Adapter | None, standardize: bool) -> IntensityReference | None:
    """The landmarks a scan is standardised to before ``base`` (with ``adapter``) reads it, or None.

    None with an intensity adapter, whatever ``standardize`` says: its map (chosen
    on the scanner's scan among the scan as it is, standardised, or a learnt curve)
    is how it brings a scan to the model, as an adapter adapted on standardised
    slices standardises whatever ``standardize`` says.
    """
    if adapter is not None and adapter.curve is not None:
        return None
    if standardize or (adapter is not None and adapter.standardizes):
        return IntensityReference.of_model(base)
    return None


def iter_segment(
    base: BaseModel,
    volume: Volume,
    adapter: Adapter | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    cleanup: bool = True,
    two_pass: bool = True,
    precision: str = "auto",
    tta: int = 1,
    smooth_mm: float = SMOOTH_MM,
    standardize: bool = False,
    brain: np.ndarray | None = None,
    curve: IntensityCurve | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[SegmentProgress | Segmentation | None]:
    """Yield :class:`SegmentProgress` per batch, then the :class:`Segmentation` (or None if stopped).

    With ``two_pass`` a coarse pass over every ``COARSE_X_STEP``-th sagittal
    slice localises the brain in 3D (:func:`brain_box`), and the full pass runs
    on that box only: the network never sees the neck below it, so it cannot
    label it, and a scan with a long field of view costs fewer slices. The
    slices the coarse pass read are not read again (:func:`reusable_slices`).
    ``tta``: mirror views averaged in the full pass (1, 2 or 4; the first pass
    only finds the box, so it reads each slice once). ``smooth_mm``: the
    Gaussian (sigma in mm) the mask's probability is smoothed with before the
    threshold; 0 thresholds the network's probability as it is. ``standardize``:
    map the scan's intensity landmarks onto the model's training heads'
    (:mod:`napari_convlora.standardize`); an adapter adapted on standardised
    slices standardises whatever this says, an intensity adapter maps the scan
    its own way whatever this says (:func:`input_reference`). ``brain``: a first segmentation's
    mask on the scan's grid; with standardisation its brain's landmarks are
    standardised too. ``curve``: an intensity curve learnt for this scan
    (:mod:`napari_convlora.intensity_curve`), applied after any standardisation;
    an intensity adapter brings its own (then none may be given).
    """
    start = time.perf_counter()
    torch_device = pick_device(device)
    inference_dtype(torch_device, precision)  # a bad name or view count fails before any work
    check_tta(tta)
    if not (np.isfinite(smooth_mm) and smooth_mm >= 0):
        raise InputError(f"the smoothing must be 0 or more mm, not {smooth_mm!r}")
    reference = input_reference(base, adapter, standardize)  # before any work: the model may have none
    if adapter is not None and adapter.curve is not None:
        if curve is not None:
            raise ValueError("an intensity adapter brings its own curve; give no other")
        curve = adapter.curve
    if brain is not None and (reference is None or brain.shape != volume.data.shape):
        raise ValueError("a brain mask needs standardisation and the scan's grid")
    unet = fold_batch_norms(apply_adapter(base, adapter))  # a copy: the base model is never touched
    geometry, scaled = plan(volume, base.intensity_scaling, reference, brain, curve)
    count = _Count(total=geometry.n_slices, start=start)
    known: dict[int, np.ndarray] = {}
    if two_pass:
        coarse = geometry.to_model(scaled, x_step=COARSE_X_STEP)
        count.total += len(coarse)
        logits = yield from _predict(unet, coarse, torch_device, batch_size, precision, count, should_stop)
        if logits is None:
            yield None
            return
        box = brain_box(geometry, expit(logits), COARSE_X_STEP)
        if box is not None:
            fine = geometry.restricted(box)
            if tta == 1:  # the fine pass's slices the coarse pass read (with mirror views they differ)
                known = reusable_slices(geometry, fine, logits, COARSE_X_STEP)
            geometry = fine
            count.total = count.done + geometry.n_slices - len(known)
        del coarse, logits
    stack = geometry.to_model(scaled)
    del scaled  # the largest array but one; the probability volumes of _finish come next
    for i, window in known.items():
        stack[i] = window
    todo = [i for i in range(len(stack)) if i not in known]
    del known
    logits = yield from _predict(unet, stack, torch_device, batch_size, precision, count, should_stop, tta, todo)
    if logits is None:
        yield None
        return
    yield _finish(geometry, logits, volume, adapter, cleanup, smooth_mm, start)


def reusable_slices(head: SliceGeometry, fine: SliceGeometry, coarse: np.ndarray, x_step: int) -> dict[int, np.ndarray]:
    """The fine pass's slices the coarse pass already read: {index in ``fine``'s stack: its logits}.

    Both passes resample the same sagittal slices to the same plane; the coarse
    pass read every ``x_step``-th one on the head's crop, the fine pass reads the
    brain's crop. Where the part of the brain's crop inside the plane lies inside
    the head's crop, those slices' logits are a window of the coarse pass's (the
    network saw more around them). Pixels of the crop outside the plane (zero
    padding, dropped again on the way back to the file's grid) repeat the edge.
    """
    (hy0, hy1, hz0, hz1), (fy0, fy1, fz0, fz1) = head.crop, fine.crop
    (ny, nz) = fine.plane_shape
    wy0, wy1, wz0, wz1 = max(fy0, 0), min(fy1, ny), max(fz0, 0), min(fz1, nz)
    if not (hy0 <= wy0 and wy1 <= hy1 and hz0 <= wz0 and wz1 <= hz1):
        return {}
    pad = ((wy0 - fy0, fy1 - wy1), (wz0 - fz0, fz1 - wz1))
    out = {}
    for i, x in enumerate(range(*fine.x_range)):
        j, rest = divmod(x - head.x_range[0], x_step)
        if rest == 0 and 0 <= j < len(coarse):
            out[i] = np.pad(coarse[j, wy0 - hy0 : wy1 - hy0, wz0 - hz0 : wz1 - hz0], pad, mode="edge")
    return out


@dataclass
class _Count:
    total: int
    start: float
    done: int = 0


def _predict(
    unet: UNet2D,
    stack: np.ndarray,
    device: torch.device,
    batch_size: int | None,
    precision: str,
    count: _Count,
    should_stop: Callable[[], bool] | None,
    tta: int = 1,
    rows: list[int] | None = None,
) -> Generator[SegmentProgress, None, np.ndarray | None]:
    """Logits of ``stack`` (its ``rows`` only; all by default), written over it; progress per batch.

    In place: each batch's logits replace its slices once the network has read
    them, so a scan costs one stack-sized array, not two. None if ``should_stop``
    said so (``stack`` is then part logits, part slices).
    """
    index = np.arange(len(stack)) if rows is None else np.asarray(rows, dtype=np.intp)
    for i in range(0, len(index), _ROWS_PER_READ):
        where = index[i : i + _ROWS_PER_READ]
        contiguous = where[-1] - where[0] + 1 == len(where)
        part = stack[where[0] : where[-1] + 1] if contiguous else stack[where]  # a view, or a copy of a few slices
        for first, batch in predict_logits(unet, part, device, batch_size, precision, tta):
            stack[where[first : first + len(batch)]] = batch  # after the network read those slices
            count.done += len(batch)
            yield SegmentProgress(count.done, count.total, time.perf_counter() - count.start)
            if should_stop is not None and should_stop():
                return None
    return stack


_ROWS_PER_READ = 64  # slices copied at a time when only some rows of a stack are read (a multiple of every batch)


def _finish(
    geometry: SliceGeometry,
    logits: np.ndarray,
    volume: Volume,
    adapter: Adapter | None,
    cleanup: bool,
    smooth_mm: float,
    start: float,
) -> Segmentation:
    """The mask on the file's grid. ``probability`` stays the network's own (the gates score it as measured)."""
    stack = expit(logits, out=logits)  # in place: the logits are not used again
    probability = geometry.from_model(stack)
    decided = geometry.from_model(smooth_stack(stack, geometry, smooth_mm)) if smooth_mm > 0 else probability
    mask = (decided > 0.5).astype(np.uint8)
    del decided
    if cleanup and mask.any():
        mask = clean_mask(mask)
    return Segmentation(
        mask=mask,
        probability=probability,
        adapter=adapter.name if adapter is not None else "none",
        seconds=time.perf_counter() - start,
        voxel_volume_ml=float(np.prod(volume.spacing)) / 1000.0,
    )


def smooth_stack(stack: np.ndarray, geometry: SliceGeometry, sigma_mm: float) -> np.ndarray:
    """``stack`` (the model's slices) smoothed in place by a Gaussian of ``sigma_mm`` in every direction, in mm.

    In place because on a scan of 0.9 mm a second stack-sized array was a
    third of this step's cost: memory a process touches for the first time is slow.
    """
    sigma = (sigma_mm / geometry.ras_spacing[0], *(sigma_mm / s for s in geometry.plane_spacing))
    return ndimage.gaussian_filter(stack, sigma, mode="nearest", output=stack)


def run_to_end(generator: Generator):
    """Run a generator of progress reports to its end and give back what it returned."""
    while True:
        try:
            next(generator)
        except StopIteration as finished:
            return finished.value


def segment(base: BaseModel, volume: Volume, adapter: Adapter | None = None, **kwargs) -> Segmentation:
    """Run :func:`iter_segment` to the end and return its result."""
    result = None
    for report in iter_segment(base, volume, adapter, **kwargs):
        result = report
    assert isinstance(result, Segmentation)
    return result
