"""The model work the widget runs off the GUI thread: plain generators around the core's generators.

Each job is a generator that yields progress (the core's own report objects)
and returns its result; :mod:`.workers` runs them in napari thread workers and
the tests can also drive them directly. No Qt here.

The widget runs them in its worker process (:mod:`.job_process`), or in a
thread of the viewer's process when that process cannot start. For that
fallback torch is imported at module level: importing it inside a worker
thread holds the GIL for ~0.4 s and freezes the viewer (measured with
``scripts/bench_gui.py``), and a thread job caps torch's intra-op threads so
that one core stays free for the GUI thread.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..adapt import AdaptCancelled, AdaptConfig, AdaptDone, adapt
from ..adapters import Adapter, save_adapter
from ..choose import choose_adapter, iter_segment_checked
from ..errors import InputError
from ..geometry import plan
from ..inference import Segmentation, SegmentProgress, iter_segment
from ..intensity_curve import CurveStep
from ..library import ADAPTER_SUFFIX, BUILTIN, check_name, resolve_adapter, user_adapter_dir
from ..library import library_files as core_library_files
from ..metrics import evaluate
from ..model import BaseModel, load_model
from ..nifti import Volume
from ..review import model_slices_around, model_slices_to_file, per_slice_surface_dice, surface_error_map
from ..selection import iter_plain_and_standardized
from ..standardize import MODES
from .job_process import CHILD_ENV

SOURCE_LABEL = "none (source model)"
AUTO_LABEL = "auto"


THREADS_ENV = "CONVLORA_TORCH_THREADS"  # overrides the choice below (benchmarks, shared machines)


def worker_threads() -> int:
    """torch intra-op threads for a job.

    In the worker process (:mod:`.job_process`) every core: the viewer has its own
    process and GIL. In a thread of the viewer's process all cores but one, which
    stays free for the GUI thread. At least one; ``CONVLORA_TORCH_THREADS`` overrides.
    """
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    cores = os.cpu_count() or 2
    return cores if os.environ.get(CHILD_ENV) else max(1, cores - 1)


def limit_threads() -> None:
    torch.set_num_threads(worker_threads())


@lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int) -> BaseModel:
    return load_model(path)


def get_model(path: str | Path) -> BaseModel:
    """The base model at ``path``, loaded once per file version (the core never modifies it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    return _cached_model(str(path), path.stat().st_mtime_ns)


_SOURCE: dict[tuple, Segmentation] = {}  # the last source-model segmentation, for the gate and auto's check


def _source_key(model_path: str | Path, volume: Volume, device: str) -> tuple:
    """What makes a source-model segmentation reusable: the model file's version, the device, the voxels, the grid."""
    path = Path(model_path)
    data = np.ascontiguousarray(volume.data)
    digest = hashlib.blake2b(memoryview(data).cast("B"), digest_size=16)
    digest.update(np.asarray(volume.affine, dtype=np.float64).tobytes())
    return str(path.resolve()), path.stat().st_mtime_ns, device, data.shape, str(data.dtype), digest.hexdigest()


def known_source(model_path: str | Path, volume: Volume, device: str) -> Segmentation | None:
    """The source model's segmentation of this very scan, if a job of this process made it (deterministic)."""
    return _SOURCE.get(_source_key(model_path, volume, device))


def remember_source(model_path: str | Path, volume: Volume, device: str, segmentation: Segmentation) -> None:
    """Keep one source segmentation (a volume's probability and mask): Adapt after Segment reuses it."""
    _SOURCE.clear()
    _SOURCE[_source_key(model_path, volume, device)] = segmentation


@dataclass
class SegmentResult:
    segmentation: Segmentation
    label: str  # "source" or the adapter's name: the mask layer is "mask: <label>"
    note: str  # what was used and why, for the widget's status line


def library_files() -> list[tuple[str, Path, bool]]:
    """(name, file, built-in?) of every adapter in the library: built-ins first, then the user's own."""
    return [(name, path, source == BUILTIN) for name, source, path in core_library_files()]


def resolve_for_widget(spec: str) -> tuple[Adapter | None, str, str]:
    """The adapter for a combo-box choice other than auto, the mask label, and a note saying what was used."""
    if spec == SOURCE_LABEL:
        return None, "source", "source model (no adapter)"
    adapter = resolve_adapter(spec)
    return adapter, adapter.name or spec, f"adapter {adapter.name or spec}"


def segment_job(
    model_path: str | Path,
    volume: Volume,
    spec: str,
    device: str,
    stop: threading.Event,
    tta: int = 1,
    standardize: str = "off",
) -> Generator[SegmentProgress | CurveStep, None, SegmentResult | None]:
    """Segment ``volume`` with the chosen adapter; yield progress; return None if stopped.

    "auto" picks without labels, then keeps the pick only if the do-no-harm check passes it
    (:func:`napari_convlora.choose.iter_segment_checked`). ``tta``: mirror views per
    slice (``convlora segment --tta``); ``standardize``: "on" standardises the scan's
    intensities first, "auto" segments every way and keeps one mask by its rule
    (``convlora segment --standardize on|auto``). The remembered source segmentation
    that Adapt reuses is the plain one: "on" neither uses nor replaces it; "auto"
    with the source model uses it as its plain run, or remembers the plain run it made.
    """
    limit_threads()
    if standardize not in MODES:
        raise ValueError(f"unknown standardisation {standardize!r}")
    if standardize == "auto" and spec == AUTO_LABEL:
        raise InputError("standardise 'auto' and adapter 'auto': choose the adapter, or standardise on or off")
    base = get_model(model_path)
    plain = tta == 1 and standardize != "on"
    source = known_source(model_path, volume, device) if plain else None
    options = {"device": device, "tta": tta, "standardize": standardize == "on"}
    if spec == AUTO_LABEL:  # with standardize "auto" refused above
        files = [path for _, path, _ in library_files()]  # built-ins first: they win a name clash, as in the library
        choice = choose_adapter(base, volume, files, device=device)
        checked = yield from iter_segment_checked(
            base, volume, choice, should_stop=stop.is_set, source=source, **options
        )
        if checked is None or stop.is_set():
            return None
        return SegmentResult(_own_mask(checked.segmentation), checked.label, checked.note)  # may be the kept one
    adapter, label, note = resolve_for_widget(spec)
    if tta > 1:
        note += f", {tta} mirror views"
    if standardize == "on":
        note += ", intensities standardised"
    if standardize == "auto":
        options.pop("standardize")
        known = source if adapter is None else None
        choice = yield from iter_plain_and_standardized(
            base, volume, adapter, should_stop=stop.is_set, plain=known, **options
        )
        if choice is None or stop.is_set():
            return None
        if adapter is None and plain and known is None:
            remember_source(model_path, volume, device, choice.plain)
        return SegmentResult(_own_mask(choice.kept), label, f"{note}; {choice.note}")
    if adapter is None and source is not None:  # the same scan, model and device: the same mask, already made
        return SegmentResult(_own_mask(source), label, note)
    result = None
    for report in iter_segment(base, volume, adapter, should_stop=stop.is_set, **options):
        if isinstance(report, SegmentProgress):
            yield report
        else:
            result = report
    if result is None or stop.is_set():
        return None
    if adapter is None and plain:
        remember_source(model_path, volume, device, result)
        result = _own_mask(result)
    return SegmentResult(result, label, note)


def _own_mask(segmentation: Segmentation) -> Segmentation:
    """The result with a mask of its own: a Labels layer the user paints on must not change the kept one."""
    return replace(segmentation, mask=segmentation.mask.copy())


@dataclass
class AdaptResult:
    done: AdaptDone
    path: Path | None  # where the adapter was saved in the library; None if the gate rejected it
    axis: int  # file axis of the sagittal slices it learned from
    file_slices: list[int] = field(default_factory=list)  # their indices along that axis


def library_path(name: str) -> Path:
    """Where an adapter called ``name`` is saved; refuses invalid names and names already taken."""
    check_name(name)
    path = user_adapter_dir() / f"{name}{ADAPTER_SUFFIX}"
    if path.exists():
        raise InputError(f"an adapter named {name!r} already exists ({path}); choose another name")
    return path


def adapt_job(
    model_path: str | Path,
    volume: Volume,
    config: AdaptConfig,
    name: str,
    stop: threading.Event,
    around: tuple[int, int, int] | None = None,
    keep_rejected: bool = False,
) -> Generator[object, None, AdaptResult | None]:
    """Adapt to ``volume`` (slices spread, or ``config.slices`` around voxel ``around``), save to the library.

    Returns None when stopped: then nothing was written (the adapter is saved
    atomically, and only after the last step). An adapter the do-no-harm gate
    rejects is saved only with ``keep_rejected`` (its result's path is None otherwise).
    """
    limit_threads()
    path = library_path(name)
    config.check()
    base = get_model(model_path)
    geometry, _ = plan(volume, base.intensity_scaling)
    if around is not None:
        indices = model_slices_around(geometry, around, config.slices)
        config = replace(config, slice_indices=indices)
    done = None
    source = known_source(model_path, volume, config.device)  # Segment, then Adapt: the gate reuses that mask
    for report in adapt(base, volume, config, name=name, should_stop=stop.is_set, source=source):
        if isinstance(report, AdaptCancelled):
            return None
        if isinstance(report, AdaptDone):
            done = report
        else:
            yield report
    if done is None or stop.is_set():
        return None
    axis, file_slices = model_slices_to_file(geometry, done.slice_indices)
    if not (done.accepted or keep_rejected):
        return AdaptResult(done, None, axis, file_slices)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(done.adapter, path, overwrite=False)
    return AdaptResult(done, path, axis, file_slices)


@dataclass
class MetricsResult:
    tolerance_mm: float
    rows: dict[str, dict[str, float]]  # mask layer name -> evaluate() figures
    per_slice: dict[str, np.ndarray]  # mask layer name -> surface Dice per slice along axis 0
    errors: dict[str, np.ndarray]  # mask layer name -> surface error map (only those asked for)


def metrics_job(
    masks: dict[str, np.ndarray],
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    tolerance_mm: float,
    error_maps_for: tuple[str, ...] = (),
    stop: threading.Event | None = None,
) -> Generator[str, None, MetricsResult | None]:
    """Dice, surface Dice @ tolerance, HD95, volumes and per-slice surface Dice of each mask against ``gt``."""
    if not tolerance_mm > 0:
        raise InputError(f"the tolerance must be positive, got {tolerance_mm}")
    gt = np.asarray(gt) > 0
    rows, per_slice, errors = {}, {}, {}
    for name, mask in masks.items():
        if stop is not None and stop.is_set():
            return None
        if mask.shape != gt.shape:
            raise InputError(f"{name}: mask shape {mask.shape} differs from the ground truth's {gt.shape}")
        mask = np.asarray(mask) > 0
        yield name
        rows[name] = evaluate(mask, gt, spacing, tolerance_mm)
        per_slice[name] = per_slice_surface_dice(mask, gt, spacing, tolerance_mm, axis=0)
        if name in error_maps_for:
            errors[name] = surface_error_map(mask, gt, spacing, tolerance_mm)
    return MetricsResult(float(tolerance_mm), rows, per_slice, errors)


def metrics_csv(result: MetricsResult) -> str:
    """The metrics table as CSV text, one row per mask."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = ("dice", "surface_dice", "tolerance_mm", "hd95_mm", "volume_ml_pred", "volume_ml_gt")
    writer.writerow(["mask", "dice", "surface_dice", "tolerance_mm", "hd95_mm", "volume_ml", "volume_ml_gt"])
    for name, figures in result.rows.items():
        writer.writerow([name, *(figures[c] for c in columns)])
    return out.getvalue()


def describe_error(exc: BaseException, device: str = "") -> str:
    """One line for a notification: the core's message for bad input, a hint for out-of-memory."""
    if isinstance(exc, InputError):
        return str(exc)
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        where = f" on {device}" if device else ""
        return f"out of memory{where}: close other programs or choose the cpu device, then try again"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"internal error ({type(exc).__name__}: {first}); nothing was changed"


StopFlag = Callable[[], bool]
