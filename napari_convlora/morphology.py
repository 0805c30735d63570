"""Binary morphology by shifted views: what scipy.ndimage does for our structuring elements, faster.

``scipy.ndimage.binary_erosion`` / ``binary_dilation`` walk a generic
structuring element voxel by voxel; for the two elements the pipeline uses (the
6-neighbourhood cross, iterated, and the 3x3x3 cube, iterated) the same result
is an AND / OR of a few shifted views of the array, which numpy does a whole
plane at a time: 10 times faster on a head in C order (measured by
``scripts/bench_inference.py --phases``). Outside the array counts as
background, as scipy's default ``border_value=0`` does, so results are equal
voxel for voxel (tests/test_morphology.py compares them with scipy's).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _shifted(ndim: int, axis: int, lo: int | None, hi: int | None) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) if a == axis else slice(None) for a in range(ndim))


def erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_erosion(mask, iterations=iterations)``: a voxel stays if its 6 neighbours are set."""
    out = np.ascontiguousarray(mask, dtype=bool)  # C order: the shifts are whole planes (Fortran: 20x slower)
    for _ in range(iterations):
        src, out = out, out.copy()
        for axis in range(out.ndim):
            out[_shifted(out.ndim, axis, 1, None)] &= src[_shifted(out.ndim, axis, None, -1)]
            out[_shifted(out.ndim, axis, None, -1)] &= src[_shifted(out.ndim, axis, 1, None)]
            out[_shifted(out.ndim, axis, 0, 1)] = False  # their neighbour outside is background
            out[_shifted(out.ndim, axis, -1, None)] = False
    return out


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_dilation(mask, iterations=iterations)``: grown by the 6-neighbourhood."""
    out = np.ascontiguousarray(mask, dtype=bool)  # C order: the shifts are whole planes (Fortran: 20x slower)
    for _ in range(iterations):
        src, out = out, out.copy()
        for axis in range(out.ndim):
            out[_shifted(out.ndim, axis, 1, None)] |= src[_shifted(out.ndim, axis, None, -1)]
            out[_shifted(out.ndim, axis, None, -1)] |= src[_shifted(out.ndim, axis, 1, None)]
    return out


def opening(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndimage.binary_opening(mask, iterations=iterations)``: what is thinner than the cross, removed."""
    return dilate(erode(mask, iterations), iterations)


def dilate_cube(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """``ndimage.binary_dilation(mask, np.ones((3,) * ndim), iterations=radius)``: a cube, one axis at a time."""
    out = np.ascontiguousarray(mask, dtype=bool)  # C order: the shifts are whole planes (Fortran: 20x slower)
    for axis in range(out.ndim):
        src, out = out, out.copy()
        for step in range(1, radius + 1):
            out[_shifted(out.ndim, axis, step, None)] |= src[_shifted(out.ndim, axis, None, -step)]
            out[_shifted(out.ndim, axis, None, -step)] |= src[_shifted(out.ndim, axis, step, None)]
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``: background not joined to the array's border (6-neighbourhood) filled.

    One labelling of the background instead of scipy's border-seeded iterated
    dilation: 2.5 to 3 times faster on a brain mask.
    """
    labels, n = ndimage.label(~np.asarray(mask, dtype=bool))
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(labels.ndim):
        outside[np.take(labels, 0, axis=axis)] = True
        outside[np.take(labels, -1, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (all of it when it has one or none)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())
