"""Where on the brain's surface a mask misses the label: by the surface's facing direction, outward or inward.

Usage:
    python scripts/probe_surface_errors.py --heads heads --eval MODEL HEAD [HEAD ...] [--eval ...]
                                           [--tolerance 1.0] [--peers] [-o out.json]

For every label surface voxel (the label's boundary, in RAS order) it takes the
distance in mm to the nearest boundary voxel of the predicted mask, the axis
the surface faces (largest component of the smoothed label's gradient: L-R,
A-P or S-I, and which side) and whether the prediction reaches beyond the label there (the
label's surface voxel lies inside the prediction: "outward") or stops short of
it ("inward"). It prints, per head, the share of surface voxels further than
``--tolerance`` from the prediction, split by facing axis and side. Why: a 2D
sagittal network sees the lateral (left and right) surfaces edge-on in no slice, so
if the misses gather there a second slicing plane is the fix; if they are
outward everywhere, the fix is a threshold or label convention, not the network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from nibabel import orientations
from scipy import ndimage

from napari_convlora.geometry import to_ras_order
from napari_convlora.inference import segment
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume

AXES = ("L", "R", "P", "A", "I", "S")  # the side of the brain the surface faces


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ornt = orientations.io_orientation(affine)
    return orientations.apply_orientation(data, orientations.ornt_transform(ornt, orientations.axcodes2ornt("RAS")))


def boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def profile(gt: np.ndarray, pred: np.ndarray, spacing: np.ndarray, tolerance: float) -> dict:
    """Shares of the label's surface voxels missed by more than ``tolerance`` mm, by facing axis and side."""
    surface = boundary(gt)
    distance = ndimage.distance_transform_edt(~boundary(pred), sampling=spacing)[surface]
    normal = np.stack(np.gradient(ndimage.gaussian_filter(gt.astype(np.float32), 1.5 / spacing), *spacing))
    along = normal[:, surface]
    axis = np.abs(along).argmax(axis=0)
    # the label's gradient points inward; an outward face on the + side of RAS axis a is 2a + 1
    facing = 2 * axis + (np.take_along_axis(along, axis[None], 0)[0] < 0)
    outward = pred[surface]
    missed = distance > tolerance
    n = int(surface.sum())
    out = {"surface_voxels": n, "missed": round(float(missed.mean()), 4)}
    for axis, name in enumerate(AXES):
        on = facing == axis
        out[name] = {
            "share_of_surface": round(float(on.mean()), 3),
            "missed_outward": round(float((missed & on & outward).sum() / max(on.sum(), 1)), 4),
            "missed_inward": round(float((missed & on & ~outward).sum() / max(on.sum(), 1)), 4),
        }
    out["volume_ratio"] = round(float(pred.sum() / gt.sum()), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("--eval", nargs="+", action="append", required=True, metavar="MODEL HEAD")
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--peers", action="store_true", help="profile mask_deepbet.nii.gz too, where present")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    rows = []
    for model_path, *names in args.eval:
        model = load_model(model_path)
        for name in names:
            volume = load_volume(args.heads / name / "t1.nii.gz")
            label = load_mask(args.heads / name / "mask_consensus.nii.gz")
            spacing = to_ras_order(volume.spacing, volume.affine)
            gt = to_ras(label.data > 0, volume.affine)
            masks = {"convlora": segment(model, volume, precision="float32").mask > 0}
            if args.peers and (args.heads / name / "mask_deepbet.nii.gz").exists():
                masks["deepbet"] = load_mask(args.heads / name / "mask_deepbet.nii.gz").data > 0
            for method, mask in masks.items():
                found = profile(gt, to_ras(mask, volume.affine), spacing, args.tolerance)
                row = {"head": name, "method": method, **found}
                rows.append(row)
                sides = "  ".join(
                    f"{a}: {row[a]['share_of_surface']:.2f} of surface, out {row[a]['missed_outward']:.3f}"
                    f" in {row[a]['missed_inward']:.3f}"
                    for a in AXES
                )
                print(f"{name:14s} {method:9s} missed {row['missed']:.3f} vol {row['volume_ratio']:.3f}  {sides}")
    if args.output:
        args.output.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
