"""Volumes <-> napari layer data, keeping the NIfTI grid so masks go back to disk on it.

Layers show the array in the order it is stored in the file (no reorientation,
so a written mask lands exactly on the input's voxels); ``scale`` is the voxel
size along each of those axes, and the affine and header travel in
``layer.metadata`` for the writer and for the core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..nifti import Volume

AFFINE_KEY = "nifti_affine"
HEADER_KEY = "nifti_header"
PATH_KEY = "nifti_path"
MADE_BY_KEY = "convlora"  # present on layers this plugin made: what made them


def layer_name(path: str | Path) -> str:
    """The file name without .nii/.nii.gz, as napari users expect for layer names."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def grid_metadata(volume: Volume) -> dict[str, Any]:
    """What a layer must carry to be written back on ``volume``'s grid."""
    meta: dict[str, Any] = {AFFINE_KEY: np.array(volume.affine, dtype=np.float64), HEADER_KEY: volume.header.copy()}
    if volume.path is not None:
        meta[PATH_KEY] = str(volume.path)
    return meta


def is_binary_mask(data: np.ndarray) -> bool:
    """Integer voxels that are all 0 or 1: a mask, shown as a Labels layer."""
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        return False
    return bool(data.min() >= 0 and data.max() <= 1)


def layer_data(volume: Volume, name: str | None = None, labels: bool | None = None) -> tuple:
    """A napari LayerData tuple for ``volume``: Labels for a 0/1 mask, else Image."""
    if labels is None:
        labels = is_binary_mask(volume.data)
    kwargs: dict[str, Any] = {
        "name": name or (layer_name(volume.path) if volume.path is not None else "volume"),
        "scale": tuple(volume.spacing),
        "metadata": grid_metadata(volume),
    }
    if labels:
        return np.asarray(volume.data, dtype=np.uint8), kwargs, "labels"
    data = np.asarray(volume.data)
    lo, hi = np.percentile(data[::4, ::4, ::4], (0.5, 99.5))
    kwargs["contrast_limits"] = (float(lo), float(hi) if hi > lo else float(data.max()))
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"


def fallback_affine(scale, translate) -> np.ndarray:
    """A diagonal voxel-to-world matrix from a layer's scale and translate (layers not read from NIfTI)."""
    affine = np.eye(4)
    n = len(scale)
    affine[:3, :3] = np.diag([float(s) for s in list(scale)[n - 3 :]])
    affine[:3, 3] = [float(t) for t in list(translate)[n - 3 :]]
    return affine


def volume_from_layer_parts(data: np.ndarray, metadata: dict, scale, translate) -> Volume:
    """A core Volume from a layer's data and attributes (affine/header from metadata when the reader set them)."""
    data = np.asarray(data)
    affine = metadata.get(AFFINE_KEY) if isinstance(metadata, dict) else None
    header = metadata.get(HEADER_KEY) if isinstance(metadata, dict) else None
    affine = np.asarray(affine, dtype=np.float64) if affine is not None else fallback_affine(scale, translate)
    if not isinstance(header, nib.Nifti1Header):
        header = nib.Nifti1Header()
    else:
        header = header.copy()
    path = metadata.get(PATH_KEY) if isinstance(metadata, dict) else None
    return Volume(data=data, affine=affine, header=header, path=Path(path) if path else None)


def volume_from_layer(layer) -> Volume:
    """A core Volume from a napari layer (duck-typed: data, metadata, scale, translate)."""
    return volume_from_layer_parts(layer.data, layer.metadata, layer.scale, layer.translate)


def aligned_kwargs(image_layer) -> dict[str, Any]:
    """Layer kwargs that put a new layer exactly over ``image_layer`` (scale, translate, rotate/shear, affine)."""
    metadata = {k: v for k, v in image_layer.metadata.items() if k in (AFFINE_KEY, HEADER_KEY, PATH_KEY)}
    return {
        "scale": tuple(image_layer.scale),
        "translate": tuple(image_layer.translate),
        "rotate": np.asarray(image_layer.rotate),
        "shear": np.asarray(image_layer.shear),
        "affine": np.asarray(image_layer.affine.affine_matrix),
        "metadata": metadata,
    }


def check_image_volume(volume: Volume, name: str) -> Volume:
    """The checks the core's reader makes, for layers that did not come from it (pasted arrays, other readers)."""
    from ..errors import InputError

    data = volume.data
    if data.ndim != 3:
        raise InputError(f"layer {name!r}: the image is {data.ndim}D; a 3D volume is needed")
    if min(data.shape) < 2:
        raise InputError(f"layer {name!r}: shape {data.shape}; every axis needs at least 2 voxels")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"layer {name!r}: unsupported voxel type {data.dtype}; a grey-level MRI volume is needed")
    if not np.isfinite(data).all():
        raise InputError(f"layer {name!r}: some voxels are NaN or Inf")
    if data.max() == data.min():
        raise InputError(f"layer {name!r}: the volume is constant; nothing to segment")
    if not np.isfinite(volume.affine).all() or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-12:
        raise InputError(f"layer {name!r}: its voxel-to-world matrix is singular")
    return volume
