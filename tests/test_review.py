"""Review helpers: surface error map, per-slice surface Dice, where adapter slices lie, upright views."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from napari_convlora.geometry import plan
from napari_convlora.metrics import surface_dice
from napari_convlora.nifti import Volume
from napari_convlora.review import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    model_slices_around,
    model_slices_to_file,
    per_slice_surface_dice,
    surface_error_map,
    upright_view,
)


def _ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2).astype(np.uint8)


def test_surface_error_map_marks_only_surface_beyond_tolerance():
    gt = _ball((40, 40, 40), (20, 20, 20), 10)
    same = surface_error_map(gt, gt, (1.0, 1.0, 1.0), 1.0)
    assert not same.any()
    bigger = _ball((40, 40, 40), (20, 20, 20), 13)  # 3 mm too big everywhere
    errors = surface_error_map(bigger, gt, (1.0, 1.0, 1.0), 1.0)
    assert (errors == FALSE_POSITIVE).any() and (errors == FALSE_NEGATIVE).any()
    assert not errors[20, 20, 20] and errors[20, 20, 33] == FALSE_POSITIVE and errors[20, 20, 30] == FALSE_NEGATIVE
    assert not surface_error_map(bigger, gt, (1.0, 1.0, 1.0), 4.0).any()  # within a 4 mm tolerance


def test_per_slice_surface_dice_equals_2d_metric():
    gt = _ball((16, 30, 30), (8, 15, 15), 5)
    pred = np.roll(gt, 2, axis=2)
    scores = per_slice_surface_dice(pred, gt, (2.0, 1.0, 1.0), 1.0, axis=0)
    assert np.isnan(scores[0]) and np.isnan(scores[-1])  # both empty
    assert scores[8] == surface_dice(gt[8], pred[8], (1.0, 1.0), 1.0) and 0 < scores[8] < 1


def test_adapter_slices_map_to_file_axes(small_volume):
    for axcodes in ("RAS", "LAS", "PIL"):
        ornt = nib.orientations.axcodes2ornt(axcodes)
        transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
        data = nib.orientations.apply_orientation(small_volume.data, transform)
        affine = small_volume.affine @ nib.orientations.inv_ornt_aff(transform, small_volume.data.shape)
        volume = Volume(data, affine, small_volume.header)
        geometry, _ = plan(volume)
        axis, indices = model_slices_to_file(geometry, [0, 3])
        assert nib.aff2axcodes(affine)[axis] in "LR"
        for model_index, file_index in zip([0, 3], indices, strict=True):
            voxel = [0, 0, 0]
            voxel[axis] = file_index
            assert geometry.disk_to_model_slice(tuple(voxel)) == model_index
        around = model_slices_around(geometry, tuple(n // 2 for n in data.shape), 4)
        assert len(around) == 4 and around == list(range(around[0], around[0] + 4))


def test_upright_view():
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    assert upright_view(ras, 0) == (2, 1, True, True)  # sagittal: S up, anterior to the left
    pil = np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])  # axes stored P, I, L
    assert nib.aff2axcodes(pil) == ("P", "I", "L")
    vertical, horizontal, up, left = upright_view(pil, 2)
    assert (vertical, horizontal, up, left) == (1, 0, False, False)
