"""Our surface Dice and HD95 equal DeepMind's ``surface-distance`` (the oracle) on real and random masks."""

from __future__ import annotations

import numpy as np
import pytest
import surface_distance as oracle
from scipy import ndimage

from napari_convlora.metrics import dice, evaluate, robust_hausdorff_from, surface_dice, surface_distances
from napari_convlora.nifti import load_mask

from .conftest import DATA, SAMPLE_MASK

REAL_PAIRS = [
    (SAMPLE_MASK, DATA / "colin27_mask_deepbet.nii.gz"),
    (DATA / "mni152_mask_consensus.nii.gz", DATA / "mni152_mask_hdbet.nii.gz"),
]


def _oracle(gt, pred, spacing, tol):
    sd = oracle.compute_surface_distances(gt.astype(bool), pred.astype(bool), spacing)
    return oracle.compute_surface_dice_at_tolerance(sd, tol), oracle.compute_robust_hausdorff(sd, 95)


@pytest.mark.parametrize("pair", REAL_PAIRS, ids=["colin27", "mni152"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 2.5)])
def test_real_masks_match_oracle(pair, spacing):
    gt, pred = load_mask(pair[0]).data, load_mask(pair[1]).data
    sd = surface_distances(gt, pred, spacing)
    for tol in (1.0, 2.0):
        expected_sdice, expected_hd95 = _oracle(gt, pred, spacing, tol)
        assert abs(surface_dice(gt, pred, spacing, tol) - expected_sdice) < 1e-6
    assert abs(robust_hausdorff_from(sd) - expected_hd95) < 1e-6


def _blob(rng, shape, n):
    mask = np.zeros(shape, bool)
    for _ in range(n):
        centre = [rng.integers(3, s - 3) for s in shape]
        radius = rng.uniform(2, min(shape) / 3)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        mask |= sum((g - c) ** 2 / radius**2 for g, c in zip(grid, centre, strict=True)) <= 1
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_with_anisotropic_spacing_match_oracle(seed):
    rng = np.random.default_rng(seed)
    ndim = 3 if seed % 3 else 2
    shape = tuple(int(s) for s in rng.integers(20, 48, ndim))
    gt = _blob(rng, shape, 3)
    pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(0, 3))) ^ (rng.random(shape) < 0.02)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, ndim))
    for tol in (0.5, 1.0, 2.7):
        expected_sdice, expected_hd95 = _oracle(gt, pred, spacing, tol)
        assert abs(surface_dice(gt, pred, spacing, tol) - expected_sdice) < 1e-6
    assert abs(robust_hausdorff_from(surface_distances(gt, pred, spacing)) - expected_hd95) < 1e-6


def test_empty_masks():
    empty, full = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    full[3:7, 3:7, 3:7] = True
    assert np.isnan(surface_dice(empty, empty, (1, 1, 1)))
    assert surface_dice(full, empty, (1, 1, 1)) == 0.0
    assert robust_hausdorff_from(surface_distances(full, empty, (1, 1, 1))) == np.inf
    assert np.isnan(dice(empty, empty))
    assert dice(full, full) == 1.0


def test_evaluate_reports_volumes_in_ml():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[5:15, 5:15, 5:15] = 1
    result = evaluate(gt, gt, (2.0, 1.0, 1.0))
    assert result["dice"] == 1.0 and result["surface_dice"] == 1.0 and result["hd95_mm"] == 0.0
    assert result["volume_ml_pred"] == pytest.approx(1000 * 2.0 / 1000)
