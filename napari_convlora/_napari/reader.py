"""The NIfTI reader: ``.nii``/``.nii.gz`` to an Image layer, or a Labels layer for a 0/1 mask.

napari asks every reader whether it wants a path; ours answers None for
anything it cannot read and never raises. The file is read (and checked by the
core) when napari asks, so a broken NIfTI file is refused with the core's
one-line reason in a notification instead of a traceback later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import InputError
from ..nifti import Volume, is_nifti_path, load_volume
from .layers import layer_data

log = logging.getLogger(__name__)

ReaderFunction = Callable[[str | Sequence[str]], list[tuple]]


def napari_get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """A reader function for NIfTI paths this plugin can read, else None (never raises)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(isinstance(p, (str, Path)) and is_nifti_path(p) for p in paths):
        return None
    volumes: list[Volume] = []
    for p in paths:
        volume = _try_load(p)
        if volume is None:
            return None
        volumes.append(volume)
    return lambda _path: [layer_data(v) for v in volumes]


def _try_load(path: str | Path) -> Volume | None:
    try:
        return load_volume(path)
    except InputError as exc:
        _notify(str(exc))
    except Exception as exc:  # a reader must never raise into napari
        log.exception("napari-convlora could not read %s", path)
        _notify(f"{path}: cannot read this NIfTI file ({type(exc).__name__}: {exc})")
    return None


def _notify(message: str) -> None:
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # used without napari (scripts): the log is enough
        log.warning(message)
        return
    show_warning(f"napari-convlora: {message}")
