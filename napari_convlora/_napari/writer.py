"""Writers: a Labels or Image layer back to NIfTI, on the grid (affine, header) it was read with.

The affine and header come from ``layer.metadata`` (set by our reader, and
copied onto every mask the widget makes); a layer that never came from a NIfTI
file gets a diagonal affine from its scale and translate. The file is written
to a temporary name and renamed, so a failure leaves nothing half-written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..nifti import NIFTI_SUFFIXES, Volume, save_mask, save_volume
from .layers import volume_from_layer_parts

_LABEL_TYPES = (np.uint8, np.uint16, np.int16, np.int32)


def _volume(data: Any, attributes: dict) -> Volume:
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"napari-convlora writes 3D volumes; this layer has {data.ndim} dimensions")
    return volume_from_layer_parts(
        data,
        attributes.get("metadata") or {},
        attributes.get("scale", (1, 1, 1)),
        attributes.get("translate", (0, 0, 0)),
    )


def _path(path: str) -> str:
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        path = f"{path}.nii.gz"
    return str(path)


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a Labels layer: uint8 0/1 for masks, the smallest integer type that holds other labels."""
    volume = _volume(data, attributes)
    path = _path(path)
    labels = volume.data
    if labels.min() >= 0 and labels.max() <= 1:
        save_mask(labels, volume, path, overwrite=True)
        return [path]
    dtype = next(t for t in _LABEL_TYPES if np.iinfo(t).min <= labels.min() and labels.max() <= np.iinfo(t).max)
    header = volume.header.copy()
    header.set_data_dtype(dtype)
    save_volume(Volume(labels.astype(dtype), volume.affine, header), path, overwrite=True)
    return [path]


def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    """Write an Image layer with its own voxel type (no intensity rescaling)."""
    volume = _volume(data, attributes)
    if volume.data.dtype == np.bool_ or volume.data.dtype == np.float16:
        volume = Volume(volume.data.astype(np.float32), volume.affine, volume.header, volume.path)
    header = volume.header.copy()
    header.set_data_dtype(volume.data.dtype)
    path = _path(path)
    save_volume(Volume(volume.data, volume.affine, header), path, overwrite=True)
    return [path]
