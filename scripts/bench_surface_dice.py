"""Time our surface Dice against DeepMind's ``surface-distance`` on a real 1 mm head mask pair.

Usage: python scripts/bench_surface_dice.py [--repeats 5]
Prints the median time of each, the speed ratio and the largest difference in the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import surface_distance as oracle

from napari_convlora.metrics import robust_hausdorff_from, surface_dice_from, surface_distances
from napari_convlora.nifti import load_mask

ROOT = Path(__file__).resolve().parent.parent
GT = ROOT / "resources" / "sample" / "colin27_mask_consensus.nii.gz"
PRED = ROOT / "tests" / "data" / "colin27_mask_deepbet.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1.0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    gt_vol, pred_vol = load_mask(GT), load_mask(PRED)
    gt, pred, spacing = gt_vol.data.astype(bool), pred_vol.data.astype(bool), gt_vol.spacing

    def ours():
        sd = surface_distances(gt, pred, spacing)
        return surface_dice_from(sd, args.tolerance), robust_hausdorff_from(sd)

    def reference():
        sd = oracle.compute_surface_distances(gt, pred, spacing)
        return oracle.compute_surface_dice_at_tolerance(sd, args.tolerance), oracle.compute_robust_hausdorff(sd, 95)

    results = {}
    for name, fn in (("surface-distance", reference), ("napari-convlora", ours)):
        fn()  # warm-up (imports, lookup table)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times), value)
        print(
            f"{name:17s} median {results[name][0] * 1000:8.1f} ms over {args.repeats}  "
            f"surface Dice @ {args.tolerance:g} mm {value[0]:.10f}  HD95 {value[1]:.4f} mm"
        )
    (t_ref, v_ref), (t_ours, v_ours) = results["surface-distance"], results["napari-convlora"]
    print(
        f"mask {gt.shape} at {spacing} mm: speed-up x{t_ref / t_ours:.1f}, "
        f"|difference| surface Dice {abs(v_ref[0] - v_ours[0]):.2e}, HD95 {abs(v_ref[1] - v_ours[1]):.2e}"
    )


if __name__ == "__main__":
    main()
