"""Recovered share of the gap and worst scan against the source model, per method, over benchmark files.

Usage:
    python scripts/compare_methods.py FILE.json ... --methods intensity curve standardize-brain

Each file is a ``convlora benchmark`` result. The recovered share is the
benchmark's own (``summary.recovery``: the mean over the target profiles whose
gap is at least ``MIN_GAP``); the worst is the lowest (method - source)
surface Dice over every scan (profile and seed) of the file, the in-domain
profile included. ``--same-as`` names methods to match the first method's cells
against: per scan, which of them gave the same surface Dice (to 0.0005).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--same-as", nargs="*", default=[])
    args = parser.parse_args()
    print("| file | " + " | ".join(f"{m}: recovered / worst" for m in args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    shares: dict[str, list[float]] = {m: [] for m in args.methods}
    matches: dict[str, int] = {}
    for path in args.files:
        result = json.loads(path.read_text())
        cells = {(c["profile"], c["seed"], c["method"]): c["surface_dice"] for c in result["cells"]}
        scans = sorted({(p, s) for p, s, m in cells if m == "source"})
        row = []
        for method in args.methods:
            share = result["summary"]["recovery"].get(method)
            worst = min(cells[p, s, method] - cells[p, s, "source"] for p, s in scans if (p, s, method) in cells)
            shares[method].append(share)
            row.append(f"{share:.0%} / {worst:+.3f}")
        print(f"| {path.stem} | " + " | ".join(row) + " |")
        first = args.methods[0]
        for p, s in scans:
            same = [m for m in args.same_as if abs(cells[p, s, m] - cells[p, s, first]) <= 0.0005]
            key = "+".join(same) or "none"
            matches[key] = matches.get(key, 0) + 1
    print("| mean | " + " | ".join(f"{np.mean(shares[m]):.0%}" for m in args.methods) + " |")
    if args.same_as:
        print(f"{args.methods[0]}'s scans with the same surface Dice as: {json.dumps(matches)}")


if __name__ == "__main__":
    main()
