"""What a reviewer looks at besides the summary metrics: where the surface is wrong, slice by slice.

Headless helpers for the napari widget (and scripts): a voxel map of surface
errors beyond the tolerance, surface Dice per slice, and where the sagittal
slices an adapter learned from lie on the file's voxel grid. Never imports Qt
or napari.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations
from scipy import ndimage

from .geometry import SliceGeometry
from .metrics import surface_dice
from .morphology import erode

FALSE_POSITIVE, FALSE_NEGATIVE = 1, 2


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour (the mask's one-voxel shell)."""
    return mask & ~erode(mask)


def surface_error_map(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> np.ndarray:
    """uint8 map: 1 where the predicted surface lies beyond ``tolerance_mm`` of the true surface
    (false-positive surface), 2 where the true surface lies beyond it from the predicted one (missed).

    A voxel-level view for visual QA of the same tolerance that surface Dice uses
    (surface Dice itself weighs surfels by area; the metric numbers come from
    :mod:`napari_convlora.metrics`).
    """
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {gt.shape}")
    out = np.zeros(pred.shape, dtype=np.uint8)
    union = pred | gt
    if not union.any():
        return out
    margin = [int(np.ceil(tolerance_mm / s)) + 2 for s in spacing]
    box = tuple(
        slice(max(int(idx.min()) - m, 0), min(int(idx.max()) + m + 1, n))
        for idx, m, n in zip(np.nonzero(union), margin, union.shape, strict=True)
    )
    p, g = pred[box], gt[box]
    p_surface, g_surface = _surface(p), _surface(g)
    sampling = tuple(float(s) for s in spacing)
    sub = out[box]
    if g_surface.any():
        to_gt = ndimage.distance_transform_edt(~g_surface, sampling=sampling)
        sub[p_surface & (to_gt > tolerance_mm)] = FALSE_POSITIVE
    else:
        sub[p_surface] = FALSE_POSITIVE
    if p_surface.any():
        to_pred = ndimage.distance_transform_edt(~p_surface, sampling=sampling)
        sub[g_surface & (to_pred > tolerance_mm)] = FALSE_NEGATIVE
    else:
        sub[g_surface] = FALSE_NEGATIVE
    return out


def per_slice_surface_dice(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float, axis: int = 0
) -> np.ndarray:
    """2D surface Dice @ ``tolerance_mm`` of every slice along ``axis`` (NaN where both are empty)."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    plane_spacing = tuple(float(s) for i, s in enumerate(spacing) if i != axis)
    scores = np.full(pred.shape[axis], np.nan)
    either = (pred | gt).any(axis=tuple(a for a in range(pred.ndim) if a != axis))
    for i in np.flatnonzero(either):
        scores[i] = surface_dice(np.take(gt, i, axis=axis), np.take(pred, i, axis=axis), plane_spacing, tolerance_mm)
    return scores


def sagittal_file_axis(geometry: SliceGeometry) -> int:
    """The file axis along which the model's sagittal (constant-x) slices are stacked."""
    return int(np.flatnonzero(np.asarray(geometry.file_ornt)[:, 0] == 0)[0])


def model_slices_to_file(geometry: SliceGeometry, indices: Sequence[int]) -> tuple[int, list[int]]:
    """The file axis and the file indices of model stack slices ``indices``."""
    axis = sagittal_file_axis(geometry)
    flip = float(np.asarray(geometry.file_ornt)[axis, 1]) < 0
    n = geometry.disk_shape[axis]
    out = []
    for i in indices:
        x = geometry.x_range[0] + int(i)
        out.append(n - 1 - x if flip else x)
    return axis, out


def model_slices_around(geometry: SliceGeometry, disk_index: Sequence[int], n: int) -> list[int]:
    """``n`` consecutive model slices centred on the sagittal slice through ``disk_index``, kept inside the head."""
    n = max(1, min(int(n), geometry.n_slices))
    centre = geometry.disk_to_model_slice(tuple(int(i) for i in disk_index))
    first = int(np.clip(centre - n // 2, 0, geometry.n_slices - n))
    return list(range(first, first + n))


def upright_view(affine: np.ndarray, slice_axis: int) -> tuple[int, int, bool, bool]:
    """How to show the slices across file axis ``slice_axis`` the way radiologists read them.

    Returns (vertical file axis, horizontal file axis, whether the vertical index must grow upwards,
    whether the horizontal index must grow leftwards): the axis nearest to superior-inferior is
    vertical with superior up; the other is horizontal with anterior (or the patient's right)
    to the left. Viewers that show arrays as stored (napari) use it to set the axis order and
    the direction of the screen axes, without touching the data.
    """
    ornt = orientations.io_orientation(affine)
    others = [a for a in range(3) if a != slice_axis]
    vertical = next((a for a in others if int(ornt[a, 0]) == 2), others[0])
    horizontal = next(a for a in others if a != vertical)
    return vertical, horizontal, bool(ornt[vertical, 1] > 0), bool(ornt[horizontal, 1] > 0)
