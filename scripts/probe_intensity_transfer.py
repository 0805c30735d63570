"""Does an intensity adapter made on one scan of a scanner serve the scanner's other scans?

Usage:
    python scripts/probe_intensity_transfer.py --model M.safetensors --t1 T1 --mask MASK \\
        [--other-t1 T1 --other-mask MASK] [--profiles ...] [--seeds 1 2] -o out.json

``convlora adapt`` (by default, ``--objective intensity``) keeps a map of the
scaled intensities chosen on one scan; a user then segments the scanner's other
scans with it. For each simulated profile this makes the adapter on the head
``--t1`` through the profile with seed 0, then segments the same head under the
same profile with each of ``--seeds`` (another bias field and noise: a rescan),
and, if given, ``--other-t1`` under the profile with seed 0 (another head on
the same scanner), with the source model and with the adapter. It prints, per
scan, surface Dice @ 1 mm of both and the change, and the share of the gap
recovered over the plausible-T1 profiles whose gap is at least 0.10 (the gap:
the source model on the source profile, seed 0, minus the source model on the
scan; the non-T1 stress profile is run but kept out of it, as the benchmark
keeps it out of every headline figure). ``--summarise`` prints the summary of
an output file again without running anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.benchmark import MIN_GAP, default_profiles
from napari_convlora.inference import segment
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import PROFILES, SOURCE_PROFILE, simulate


def _surface_dice(base, scan, truth, adapter=None) -> float:
    mask = segment(base, scan, adapter, device="cpu").mask
    return round(evaluate(mask, truth.data, scan.spacing)["surface_dice"], 4)


def summarise(rows: list[dict], in_domain: dict) -> dict:
    """The recovered share over plausible-T1 target scans with a gap, and the worst change on any scan."""
    targets = [r for r in rows if r["profile"] != SOURCE_PROFILE and r["gap"] >= MIN_GAP]
    shares = [(r["adapter"] - r["source"]) / r["gap"] for r in targets if not PROFILES[r["profile"]].stress]
    changes = [r["adapter"] - r["source"] for r in rows]
    return {
        "recovered": round(float(np.mean(shares)), 3) if shares else None,
        "scans_with_gap": len(shares),
        "worst_change": round(min(changes), 4),
        "in_domain": in_domain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--t1", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--other-t1", type=Path)
    parser.add_argument("--other-mask", type=Path)
    parser.add_argument("--profiles", nargs="+", default=default_profiles())
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--summarise", action="store_true", help="print the summary of --output again, run nothing")
    args = parser.parse_args()
    if args.summarise:
        saved = json.loads(args.output.read_text())
        print(json.dumps(summarise(saved["rows"], saved["summary"]["in_domain"])))
        return
    base = load_model(args.model)
    heads = [("same head", load_volume(args.t1), load_mask(args.mask), args.seeds)]
    if args.other_t1 is not None:
        heads.append(("other head", load_volume(args.other_t1), load_mask(args.other_mask), [0]))
    rows = []
    in_domain = {}
    for name, t1, mask, _ in heads:
        scan, truth = simulate(t1, mask, SOURCE_PROFILE, seed=0)
        in_domain[name] = _surface_dice(base, scan, truth)
    for profile in args.profiles:
        scan, _ = simulate(heads[0][1], heads[0][2], profile, seed=0)
        done = run_adaptation(base, scan, AdaptConfig(device="cpu"), name=profile)
        kept = done.adapter.metadata["input"]
        for name, t1, mask, seeds in heads:
            for seed in seeds:
                scan, truth = simulate(t1, mask, profile, seed=seed)
                source = _surface_dice(base, scan, truth)
                moved = _surface_dice(base, scan, truth, done.adapter) if kept != "plain" else source
                row = {"profile": profile, "scan": name, "seed": seed, "input": kept, "source": source,
                       "adapter": moved, "gap": round(in_domain[name] - source, 4)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows, in_domain)
    print(json.dumps(summary))
    args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                       "summary": summary}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
