"""How the confidence gate's sure-source rule was chosen: fitted on seven benchmark files, checked on four others.

Usage:
    python scripts/probe_gate_rule.py

Offline, from the per-cell confidences and surface Dice stored in
``benchmarks/results_2026-12-0[45]_*.json`` (every file with confidences but
the single-seed one). The rule: keep an adapted or standardised mask if its
mask confidence beats the source model's by 0 where the source's confidence
is under ``T``, and by ``m`` from ``T`` on. The fit: over the seven files of
the bases made before 2026-12-05's seventh session, the (T, m) of the grid
with the highest mean recovered share such that no cell of any file and
method ends more than 0.01 below the source model. The check: the same rule
on the four files of the third training round (``_r3_``), which no part of
the fit read. Prints the best grid points, the plain gate (T = 1) on both
sets, and the chosen rule per file and method.
"""

from __future__ import annotations

import glob
import json

import numpy as np
from probe_pick_objective import recovered_share  # scripts/ is on the path when this runs as a script

from napari_convlora.benchmark import PROFILES

HELD_OUT = "_r3_"
METHODS = ("convlora+adabn", "standardize", "standardize+convlora+adabn", "stats+prior", "stats", "prior")


def load() -> dict[str, dict]:
    files = {}
    for path in sorted(glob.glob("benchmarks/results_2026-12-0[45]_*.json")):
        cells = {(c["profile"], c["seed"], c["method"]): c for c in json.load(open(path))["cells"] if "confidence" in c}
        if cells:
            files[path] = cells
    return files


def evaluate(cells: dict, method: str, threshold: float, margin: float) -> tuple[float, float] | None:
    """(recovered share over profiles with a gap >= MIN_GAP, worst change) of ``method`` under the rule."""
    scans = sorted({(p, s) for p, s, m in cells if m == "source" and not PROFILES[p].stress})
    if not any((p, s, method) in cells for p, s in scans):
        return None
    change: dict[str, list[float]] = {}
    for profile, seed in scans:
        source, cell = cells[profile, seed, "source"], cells.get((profile, seed, method))
        need = 0.0 if source["confidence"] < threshold else margin
        kept = cell if cell is not None and cell["confidence"] > source["confidence"] + need else source
        change.setdefault(profile, []).append(kept["surface_dice"] - source["surface_dice"])
    every = [d for deltas in change.values() for d in deltas]
    return recovered_share(cells, change), float(min(every))


def rows(files: dict, held_out: bool, threshold: float, margin: float) -> list[tuple[str, str, float, float]]:
    out = []
    for path, cells in files.items():
        if (HELD_OUT in path) != held_out:
            continue
        for method in METHODS:
            result = evaluate(cells, method, threshold, margin)
            if result is not None:
                out.append((path.split("results_")[1], method, *result))
    return out


def overall(found: list[tuple[str, str, float, float]]) -> tuple[float, float]:
    return float(np.nanmean([r[2] for r in found])), min(r[3] for r in found)


def main() -> int:
    files = load()
    grid = []
    for threshold in (0.70, 0.71, 0.72, 0.73, 0.74, 0.75, 1.0):
        for margin in (0.0, 0.005, 0.01, 0.015, 0.02, 0.03):
            share, worst = overall(rows(files, False, threshold, margin))
            grid.append((worst >= -0.01, share, worst, threshold, margin))
    grid.sort(reverse=True)
    print("| T | m | floor kept (fit files) | mean recovered (fit files) | worst (fit files) |\n|---|---|---|---|---|")
    for ok, share, worst, threshold, margin in grid[:5]:
        print(f"| {threshold:.2f} | {margin:.3f} | {ok} | {share:.1%} | {worst:+.3f} |")
    chosen = grid[0][3:]
    for name, (threshold, margin) in (("plain gate", (1.0, 0.0)), ("chosen rule", chosen)):
        for held_out in (False, True):
            share, worst = overall(rows(files, held_out, threshold, margin))
            print(f"{name} (T={threshold:.2f}, m={margin:.3f}) on the {'held-out' if held_out else 'fit'} files: "
                  f"mean recovered {share:.1%}, worst {worst:+.3f}")  # fmt: skip
    print("\n| file | method | recovered | worst |\n|---|---|---|---|")
    for held_out in (False, True):
        for path, method, share, worst in rows(files, held_out, *chosen):
            print(f"| {path} | {method} | {share:.0%} | {worst:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
