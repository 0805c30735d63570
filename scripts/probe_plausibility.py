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
- ``confidence``: mean |p - 0.5| * 2 over the voxels where either mask is set;
- ``slice_confidence``: the same on the 10 slices adaptation read, over the pixels
  with p > 0.5 (what a gate could use without segmenting the whole scan).

and the true surface Dice against the carried mask. Prints one line per scan
and, over all scans, how often the sign of each score's change (adapted minus
source) agrees with the sign of the true change, and the Spearman correlation of
the changes. ``--reuse`` takes the whole-volume figures of an earlier run and
only re-adapts (the adapters are the same: seeded) to add the slice scores.
A probe: it informs the gate's design; nothing ships from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.adapters import apply_adapter
from napari_convlora.benchmark import target_slices
from napari_convlora.inference import segment
from napari_convlora.metrics import dice, evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import PROFILES, simulate

SCORES = ("consistency", "cleanup", "confidence", "slice_confidence")


def volume_scores(result) -> dict[str, float]:
    raw = result.probability > 0.5
    union = raw | (result.mask > 0)
    return {
        "cleanup": float(dice(raw, result.mask > 0)),
        "confidence": float(np.mean(np.abs(result.probability[union] - 0.5)) * 2) if union.any() else 0.0,
    }


def slice_confidence(unet, images: torch.Tensor) -> float:
    """Mean 2p - 1 over the pixels a model puts in the brain (p > 0.5) on the given slices."""
    with torch.no_grad():
        prob = torch.sigmoid(unet.eval()(images))
    inside = prob > 0.5
    return float((2 * prob[inside] - 1).mean()) if inside.any() else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t1", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--profiles", nargs="+", default=[p for p, v in PROFILES.items() if not v.stress])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--reuse", type=Path, help="whole-volume figures from an earlier run's JSON")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    earlier = {}
    if args.reuse:
        earlier = {(r["profile"], r["seed"]): r for r in json.loads(args.reuse.read_text())["rows"]}
    base = load_model(args.model)
    volume, mask = load_volume(args.t1), load_mask(args.mask)
    rows = []
    for profile in args.profiles:
        for seed in args.seeds:
            scan, truth = simulate(volume, mask, profile, seed)
            done = run_adaptation(base, scan, AdaptConfig(seed=seed, device="cpu"), name=profile)
            row = {"profile": profile, "seed": seed, "accepted": done.accepted}
            images = target_slices(base, scan, AdaptConfig(seed=seed))[2]
            assert done.slice_indices == target_slices(base, scan, AdaptConfig(seed=seed))[1]
            for label, adapter, score in (("source", None, done.source_score), ("adapted", done.adapter, done.score)):
                if (profile, seed) in earlier:
                    row[label] = dict(earlier[profile, seed][label])
                else:
                    result = segment(base, scan, adapter, device="cpu")
                    figures = evaluate(result.mask, truth.data > 0, truth.spacing)
                    row[label] = {"surface_dice": round(float(figures["surface_dice"]), 4),
                                  "hd95_mm": round(float(figures["hd95_mm"]), 2),
                                  **{k: round(v, 4) for k, v in volume_scores(result).items()}}  # fmt: skip
                row[label]["consistency"] = round(score, 4)
                row[label]["slice_confidence"] = round(slice_confidence(apply_adapter(base, adapter), images), 4)
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
