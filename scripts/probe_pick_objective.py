"""Would adapting twice, with two objectives, and keeping the more confident mask help? Offline, from benchmark cells.

Usage:
    python scripts/probe_pick_objective.py RESULTS.json [RESULTS.json ...] [--max-methods 2]

Reads the cells of ``convlora benchmark`` runs on one base model and head
(several files are merged: their source cells are the same), and for every
set of up to ``--max-methods`` adapted methods applies one rule per cell: of
the masks that pass the confidence gate (``selection.accepted_by_confidence``),
keep the most confident; if none does, the source model's. Prints, per set,
the recovered share of the gap (as the benchmark computes it, over profiles
with a gap of at least ``MIN_GAP``, stress profiles left out), the worst and
mean change against the source model, and the ceiling: the share recovered
by keeping, per cell, the set's mask with the best true surface Dice (labels
used; no label-free rule does better). Nothing is run again: the figures come
from the cells' stored surface Dice and confidences.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from napari_convlora.benchmark import MIN_GAP, PROFILES, SOURCE_PROFILE
from napari_convlora.selection import accepted_by_confidence


def load_cells(paths: list[Path]) -> dict[tuple[str, int, str], dict]:
    cells = {}
    for path in paths:
        for cell in json.loads(path.read_text())["cells"]:
            cells[cell["profile"], cell["seed"], cell["method"]] = cell
    return cells


def pick(cells: dict, methods: tuple[str, ...], oracle: bool = False) -> tuple[float, float, float]:
    """(recovered share, worst change, mean change) of keeping the most confident accepted mask per cell.

    With ``oracle`` the mask with the best true surface Dice (the source model's
    included) is kept instead: the ceiling of any label-free selection among ``methods``.
    """
    scans = sorted({(p, s) for p, s, m in cells if m == "source" and not PROFILES[p].stress})
    change: dict[str, list[float]] = {}
    for profile, seed in scans:
        source = cells[profile, seed, "source"]
        passed = [
            cells[profile, seed, m]
            for m in methods
            if (profile, seed, m) in cells
            and accepted_by_confidence(cells[profile, seed, m]["confidence"], source["confidence"])
        ]
        kept = max(passed, key=lambda c: c["confidence"]) if passed else source
        if oracle:
            kept = max(
                [source] + [cells[profile, seed, m] for m in methods if (profile, seed, m) in cells],
                key=lambda c: c["surface_dice"],
            )
        change.setdefault(profile, []).append(kept["surface_dice"] - source["surface_dice"])
    every = [d for deltas in change.values() for d in deltas]
    return recovered_share(cells, change), float(min(every)), float(np.mean(every))


def recovered_share(cells: dict, change: dict[str, list[float]]) -> float:
    """Mean over profiles with a gap >= MIN_GAP of (mean change / the source model's gap), as the benchmark does."""
    shares = []
    for profile, deltas in change.items():
        if profile == SOURCE_PROFILE:
            continue
        seeds = sorted(s for p, s, m in cells if p == profile and m == "source")
        gap = np.mean(
            [
                cells[SOURCE_PROFILE, s, "source"]["surface_dice"] - cells[profile, s, "source"]["surface_dice"]
                for s in seeds
            ]
        )
        if gap >= MIN_GAP:
            shares.append(np.mean(deltas) / gap)
    return float(np.mean(shares)) if shares else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--max-methods", type=int, default=2)
    args = parser.parse_args()
    cells = load_cells(args.results)
    methods = sorted({m for _, _, m in cells} - {"source"})
    print(
        "| methods | recovered share with the gate | worst vs source | mean change | best mask picked with labels |\n"
        "|---|---|---|---|---|"
    )
    for k in range(1, args.max_methods + 1):
        for combo in itertools.combinations(methods, k):
            share, worst, mean = pick(cells, combo)
            ceiling = pick(cells, combo, oracle=True)[0]
            print(f"| {' + '.join(combo)} | {share:.0%} | {worst:+.3f} | {mean:+.3f} | {ceiling:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
