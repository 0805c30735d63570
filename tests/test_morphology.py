"""The shifted-view morphology equals scipy.ndimage's, voxel for voxel, on awkward shapes and layouts."""

import numpy as np
import pytest
from scipy import ndimage

from napari_convlora import morphology

SHAPES = [(1, 1, 1), (2, 3, 1), (1, 7, 9), (5, 4, 6), (23, 31, 17), (12, 40)]


def _blobs(shape: tuple[int, ...], seed: int, fortran: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.5 if min(shape) > 1 else rng.random(shape) > 0.4
    mask ^= rng.random(shape) < 0.03  # specks and pinholes
    return np.asfortranarray(mask) if fortran else mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_erode_dilate_opening_equal_scipy(shape, iterations):
    for seed in range(3):
        mask = _blobs(shape, seed, fortran=seed == 2)
        before = mask.copy()
        assert np.array_equal(morphology.erode(mask, iterations), ndimage.binary_erosion(mask, iterations=iterations))
        assert np.array_equal(morphology.dilate(mask, iterations), ndimage.binary_dilation(mask, iterations=iterations))
        assert np.array_equal(morphology.opening(mask, iterations), ndimage.binary_opening(mask, iterations=iterations))
        assert np.array_equal(mask, before)  # the input is never written


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_dilate_cube_equals_scipy(shape, radius):
    for seed in range(3):
        mask = _blobs(shape, seed)
        cube = np.ones((3,) * mask.ndim, dtype=bool)
        expected = ndimage.binary_dilation(mask, cube, iterations=radius)
        assert np.array_equal(morphology.dilate_cube(mask, radius), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_fill_holes_equals_scipy(shape):
    for seed in range(4):
        mask = _blobs(shape, seed)
        if len(shape) == 3 and min(shape) >= 5:  # a closed shell with a hole inside, and a hole that reaches the border
            mask[1:4, 1:4, 1:4] = True
            mask[2, 2, 2] = False
            mask[0, 2:4, 2] = False
        assert np.array_equal(morphology.fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_largest_component_keeps_only_the_biggest_6_connected_piece():
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[5:9, 5:9, 5:9] = True  # 64 voxels
    mask[4, 4, 4] = True  # touches the big cube by a corner only: not 6-connected
    kept = morphology.largest_component(mask)
    assert kept.sum() == 64 and kept[5:9, 5:9, 5:9].all() and not kept[4, 4, 4]
    assert not morphology.largest_component(np.zeros((3, 3, 3), dtype=bool)).any()
