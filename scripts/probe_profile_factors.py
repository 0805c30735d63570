"""Which part of a simulated scanner costs the source model its accuracy: one factor at a time set back to ge-3t's.

Usage:
    python scripts/probe_profile_factors.py HEAD MODEL PROFILE [PROFILE ...] [--standardize] [--seeds 0 1]

HEAD names a folder of ``heads/`` (``t1.nii.gz``, ``mask_consensus.nii.gz``);
MODEL should be a base model that did not train on it. For each profile the
head is simulated as it is, and with each factor (contrast, bias field, noise,
blur and voxel size, pose and field of view) taken back to the source
profile's; each is segmented as ``convlora segment`` does by default (with
``--standardize``: standardised) and scored against the carried mask. Prints
one line per variant: mean surface Dice @ 1 mm over the seeds, and each seed's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_convlora import simulate
from napari_convlora.inference import segment
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume


def factors(source: simulate.Profile) -> dict[str, dict]:
    """What each variant takes back to the source profile."""
    return {
        "contrast": {"contrast": source.contrast},
        "bias": {"bias": source.bias},
        "noise": {"snr": source.snr},
        "blur+voxel": {"blur_mm": source.blur_mm, "voxel_mm": source.voxel_mm},
        "pose": {
            "tilt_deg": source.tilt_deg,
            "fov_shift_mm": source.fov_shift_mm,
            "fov_margin_mm": source.fov_margin_mm,
            "axcodes": source.axcodes,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head")
    parser.add_argument("model", type=Path)
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--standardize", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heads", type=Path, default=Path("heads"))
    args = parser.parse_args()
    base = load_model(args.model)
    volume = load_volume(args.heads / args.head / "t1.nii.gz")
    mask = load_mask(args.heads / args.head / "mask_consensus.nii.gz")
    for name in args.profiles:
        profile = simulate.get_profile(name)
        variants = {"as is": profile} | {
            f"no {k}": replace(profile, name=f"{name}-no-{k}", **kw)
            for k, kw in factors(simulate.get_profile(simulate.SOURCE_PROFILE)).items()
        }
        for label, variant in variants.items():
            simulate.PROFILES[variant.name] = variant  # simulate() looks profiles up by name
            scores = []
            for seed in args.seeds:
                scan, carried = simulate.simulate(volume, mask, variant.name, seed)
                result = segment(base, scan, device="cpu", standardize=args.standardize)
                scores.append(evaluate(result.mask, carried.data > 0, carried.spacing)["surface_dice"])
            each = " ".join(f"{s:.3f}" for s in scores)
            print(f"{args.head} {name} {label}: surface Dice {np.mean(scores):.3f} ({each})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
