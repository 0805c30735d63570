"""Probe: does a 3D label-free score see what the gate's 2D perturbation consistency misses?

Usage:
    python scripts/probe_plausibility.py --t1 heads/ds000031/t1.nii.gz --mask heads/ds000031/mask_consensus.nii.gz \\
        --model benchmarks/loho_gpu_wo_ds000031.safetensors [--profiles ...] [--seeds 0 1] [-o out/probe.json]

For every simulated profile and seed, the default adaptation (ConvLoRA + AdaBN,
early head, epoch by consistency) runs on the simulated scan; the source and
the adapted model segment the whole scan (the default pipeline). Label-free
scores of each whole-volume result:

- ``consistency``: the gate's score (10 slices, noise/bias/blur), as adapt reports it;
- ``cleanup``: Dice between the thresholded probability and the mask after the 3D
  clean-up (opening, largest piece, hole filling): how much the clean-up had to
  change, a deterministic stand-in for a denoising shape prior;
- ``confidence``: mean |p - 0.5| * 2 over the voxels where either mask is set.

and the true surface Dice against the carried mask. Prints one line per scan
and, over all scans, how often the sign of each score's change (adapted minus
source) agrees with the sign of the true change, and the Spearman correlation of
the changes. A probe: it informs the gate's design; nothing ships from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.inference import segment
from napari_convlora.metrics import dice, evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import PROFILES, simulate

SCORES = ("consistency", "cleanup", "confidence")


def volume_scores(result) -> dict[str, float]:
    raw = result.probability > 0.5
    union = raw | (result.mask > 0)
    return {
        "cleanup": float(dice(raw, result.mask > 0)),
        "confidence": float(np.mean(np.abs(result.probability[union] - 0.5)) * 2) if union.any() else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t1", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=[p for p, v in PROFILES.items() if not v.stress])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    base = load_model(args.model)
    volume, mask = load_volume(args.t1), load_mask(args.mask)
    rows = []
    for profile in args.profiles:
        for seed in args.seeds:
            scan, truth = simulate(volume, mask, profile, seed)
            done = run_adaptation(base, scan, AdaptConfig(seed=seed, device="cpu"), name=profile)
            row = {"profile": profile, "seed": seed, "accepted": done.accepted}
            for label, adapter, score in (("source", None, done.source_score), ("adapted", done.adapter, done.score)):
                result = segment(base, scan, adapter, device="cpu")
                figures = evaluate(result.mask, truth.data > 0, truth.spacing)
                row[label] = {"surface_dice": round(float(figures["surface_dice"]), 4),
                              "hd95_mm": round(float(figures["hd95_mm"]), 2),
                              "consistency": round(score, 4),
                              **{k: round(v, 4) for k, v in volume_scores(result).items()}}  # fmt: skip
            rows.append(row)
            s, a = row["source"], row["adapted"]
            print(f"{profile:13s} seed {seed}  true {s['surface_dice']:.3f} -> {a['surface_dice']:.3f}  "
                  + "  ".join(f"{k} {s[k]:.3f} -> {a[k]:.3f}" for k in SCORES), flush=True)  # fmt: skip
    true_gain = np.array([r["adapted"]["surface_dice"] - r["source"]["surface_dice"] for r in rows])
    summary = {}
    for key in SCORES:
        gain = np.array([r["adapted"][key] - r["source"][key] for r in rows])
        sign = float(np.mean(np.sign(gain) == np.sign(true_gain)))
        rho = float(spearmanr(gain, true_gain).statistic) if len(rows) > 2 else float("nan")
        summary[key] = {"sign_agreement": round(sign, 3), "spearman_gain": round(rho, 3)}
        print(f"{key:12s} sign of the change right on {sign:.0%} of scans, Spearman of the changes {rho:+.2f}")
    if args.output:
        args.output.write_text(json.dumps({"argv": sys.argv, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
