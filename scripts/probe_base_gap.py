"""Share of one base's simulated-scanner gap that another base (and a method on it) closes.

Usage:
    python scripts/probe_base_gap.py OLD.json NEW.json [OLD.json NEW.json ...]

Each pair is two ``convlora benchmark`` results of the same head, profiles and
seeds with two base models (methods ``source``, ``standardize``,
``convlora+adabn``). The gap is the OLD base's: its source model on the source
profile minus on each profile, kept where it is at least 0.10, as the benchmark
does. Prints, for both bases and each method with and without the confidence
gate (a cell's adapted mask kept only if more confident than the source
model's, else the source cell), the mean share of that gap closed. Made for
BENCHMARKS.md section 2 ("The adaptation benchmark on the curve-trained bases").
"""

from __future__ import annotations

import json
import sys

import numpy as np

from napari_convlora.benchmark import MIN_GAP, SOURCE_PROFILE
from napari_convlora.selection import accepted_by_confidence

METHODS = ("source", "standardize", "convlora+adabn")


def load_cells(path: str) -> dict[tuple[str, str, int], dict]:
    return {(c["method"], c["profile"], c["seed"]): c for c in json.load(open(path))["cells"]}


def mean_surface_dice(cells: dict, method: str, profile: str, seeds: list[int], gated: bool) -> float:
    values = []
    for seed in seeds:
        cell = cells[(method, profile, seed)]
        kept = accepted_by_confidence(cell["confidence"], cell["source_confidence"])
        if gated and method != "source" and not kept:
            cell = cells[("source", profile, seed)]
        values.append(cell["surface_dice"])
    return float(np.mean(values))


def main(paths: list[str]) -> None:
    if not paths or len(paths) % 2:
        raise SystemExit(__doc__)
    for old_path, new_path in zip(paths[::2], paths[1::2], strict=True):
        old, new = load_cells(old_path), load_cells(new_path)
        profiles = sorted({p for _, p, _ in old})
        seeds = sorted({s for _, _, s in old})
        source = {p: mean_surface_dice(old, "source", p, seeds, False) for p in profiles}
        gap = {p: source[SOURCE_PROFILE] - source[p] for p in profiles}
        gapped = [p for p in profiles if p != SOURCE_PROFILE and gap[p] >= MIN_GAP]
        print(f"{old_path} -> {new_path}: old gaps {', '.join(f'{p} {gap[p]:.3f}' for p in gapped)}")
        for label, cells in (("old base", old), ("new base", new)):
            for method in METHODS:
                for gated in (False, True) if method != "source" else (False,):
                    share = np.mean(
                        [(mean_surface_dice(cells, method, p, seeds, gated) - source[p]) / gap[p] for p in gapped]
                    )
                    print(f"  {label}, {method}, {'confidence gate' if gated else 'no gate'}: {share:.0%}")


if __name__ == "__main__":
    main(sys.argv[1:])
