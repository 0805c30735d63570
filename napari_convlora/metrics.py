"""Segmentation metrics in mm: Dice, surface Dice at a tolerance, 95% Hausdorff distance.

Surface Dice is defined exactly as DeepMind's ``surface-distance`` package
(``compute_surface_dice_at_tolerance``): surface elements ("surfels") come from
the 2x2(x2) neighbour code of each mask, weighted by their area from the
package's own marching-cubes table, which we import rather than copy. What we
do differently is the distance computation: instead of two Euclidean distance
transforms over the whole bounding box, a k-d tree over the surfel positions
answers exactly the same nearest-surfel distances for the surfels only, which is
several times faster on a head (see ``scripts/bench_surface_dice.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from surface_distance import lookup_tables


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances (mm) from each surfel of one mask to the other mask's surface, and surfel areas."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    surfel_areas_gt: np.ndarray
    surfel_areas_pred: np.ndarray


@lru_cache(maxsize=32)
def _area_table(spacing: tuple[float, ...]) -> np.ndarray:
    if len(spacing) == 3:
        return lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    return lookup_tables.create_table_neighbour_code_to_contour_length(spacing)


def _check(gt: np.ndarray, pred: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    gt, pred = np.asarray(gt).astype(bool, copy=False), np.asarray(pred).astype(bool, copy=False)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} vs {pred.shape}")
    if gt.ndim not in (2, 3) or len(spacing) != gt.ndim:
        raise ValueError(f"need 2D or 3D masks with one spacing per axis, got {gt.ndim}D and {len(spacing)}")
    return gt, pred, tuple(float(s) for s in spacing)


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing) -> SurfaceDistances:
    """Surfel distances and areas, as ``surface_distance.compute_surface_distances`` (unsorted)."""
    gt, pred, spacing = _check(gt, pred, spacing)
    empty = np.zeros(0)
    union = gt | pred
    if not union.any():
        return SurfaceDistances(empty, empty, empty, empty)
    lo = [
        int(np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != ax)))[0])
        for ax in range(union.ndim)
    ]
    hi = [
        int(np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != ax)))[-1])
        for ax in range(union.ndim)
    ]
    window = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
    kernel = (
        lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL if gt.ndim == 3 else lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL
    )
    full = 0b11111111 if gt.ndim == 3 else 0b1111
    table = _area_table(spacing)
    spacing_arr = np.asarray(spacing)

    # One correlation for both masks: gt in the low byte, pred in the high byte of a uint16.
    crop = np.zeros([b - a + 2 for a, b in zip(lo, hi, strict=True)], np.uint16)
    inner = tuple(slice(0, -1) for _ in lo)
    crop[inner] = gt[window]
    crop[inner] |= pred[window].astype(np.uint16) << 8
    codes = ndimage.correlate(crop, kernel.astype(np.uint16), mode="constant", cval=0).ravel()
    shape = crop.shape

    def surfels(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.flatnonzero((code != 0) & (code != full))
        return index, table[code[index]]

    index_gt, areas_gt = surfels((codes & 0xFF).astype(np.uint8))
    index_pred, areas_pred = surfels((codes >> 8).astype(np.uint8))
    return SurfaceDistances(
        _distances(index_gt, index_pred, shape, spacing_arr),
        _distances(index_pred, index_gt, shape, spacing_arr),
        areas_gt,
        areas_pred,
    )


def _distances(index: np.ndarray, target: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each surfel (flat, sorted voxel ``index``) to the nearest ``target`` surfel.

    Surfels on both surfaces are at distance 0 without a query; for a good
    segmentation that is most of them, so the k-d tree answers only the rest.
    """
    out = np.zeros(len(index))
    if len(target) == 0:
        out[:] = np.inf
        return out
    shared = np.isin(index, target, assume_unique=True, kind="sort")
    if shared.all():
        return out

    from scipy.spatial import cKDTree  # here: importing scipy.spatial costs every `convlora segment` 70 ms

    voxels = np.stack(np.unravel_index(index[~shared], shape), axis=1)
    target_voxels = np.stack(np.unravel_index(target, shape), axis=1)
    tree = cKDTree(target_voxels * spacing, balanced_tree=False, compact_nodes=False)
    nearest = tree.query(voxels * spacing, k=1, workers=-1)[1]
    # Distance from the integer offset, summed over axes in order, exactly as scipy's
    # distance_transform_edt does: ties at the tolerance (common with anisotropic
    # spacing) then round the same way as in the reference package.
    offset = (target_voxels[nearest] - voxels).T * spacing[:, None]
    out[~shared] = np.sqrt(np.add.reduce(offset * offset, axis=0))
    return out


def surface_dice(gt: np.ndarray, pred: np.ndarray, spacing, tolerance_mm: float = 1.0) -> float:
    """Surface Dice at ``tolerance_mm``; NaN when both masks are empty (as the reference package)."""
    return surface_dice_from(surface_distances(gt, pred, spacing), tolerance_mm)


def surface_dice_from(sd: SurfaceDistances, tolerance_mm: float) -> float:
    overlap = (
        sd.surfel_areas_gt[sd.distances_gt_to_pred <= tolerance_mm].sum()
        + sd.surfel_areas_pred[sd.distances_pred_to_gt <= tolerance_mm].sum()
    )
    total = sd.surfel_areas_gt.sum() + sd.surfel_areas_pred.sum()
    return float(overlap / total) if total > 0 else float("nan")


def robust_hausdorff_from(sd: SurfaceDistances, percent: float = 95.0) -> float:
    """Area-weighted ``percent`` percentile Hausdorff distance, as ``compute_robust_hausdorff``."""

    def directed(distances: np.ndarray, areas: np.ndarray) -> float:
        if len(distances) == 0:
            return float("inf")
        order = np.lexsort((areas, distances))
        cumulative = np.cumsum(areas[order]) / areas.sum()
        idx = int(np.searchsorted(cumulative, percent / 100.0))
        return float(distances[order][min(idx, len(distances) - 1)])

    return max(
        directed(sd.distances_gt_to_pred, sd.surfel_areas_gt),
        directed(sd.distances_pred_to_gt, sd.surfel_areas_pred),
    )


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice; NaN when both masks are empty."""
    gt, pred = np.asarray(gt).astype(bool, copy=False), np.asarray(pred).astype(bool, copy=False)
    total = int(gt.sum()) + int(pred.sum())
    return 2.0 * int(np.logical_and(gt, pred).sum()) / total if total else float("nan")


def evaluate(pred: np.ndarray, gt: np.ndarray, spacing, tolerance_mm: float = 1.0) -> dict[str, float]:
    """Every figure ``convlora evaluate`` reports, from one surface computation."""
    sd = surface_distances(gt, pred, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "dice": dice(gt, pred),
        "surface_dice": surface_dice_from(sd, tolerance_mm),
        "hd95_mm": robust_hausdorff_from(sd, 95.0),
        "tolerance_mm": float(tolerance_mm),
        "volume_ml_pred": float(np.count_nonzero(pred)) * voxel_ml,
        "volume_ml_gt": float(np.count_nonzero(gt)) * voxel_ml,
    }
