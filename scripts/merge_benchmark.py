"""Merge `convlora benchmark` result files that ran different methods side by side into one.

Usage: python scripts/merge_benchmark.py PART.json [PART.json ...] -o RESULTS.json [--markdown TABLE.md]

On a machine with more cores than one benchmark uses, the methods can run as
separate processes (`--methods ...`, each with its own `-o`); this joins them.
The parts must share the settings, the base model and the seeds. A cell found
in several parts (the `source` cells, which every run measures) must have the
same surface Dice in each, or the merge is refused. The merged file keeps every
part's command, date and machine under "parts", and its summary and table are
computed by the same code as the benchmark's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_convlora.benchmark import METHODS, cells_from_json, cells_to_json, markdown, summarise
from napari_convlora.files import atomic_write


def merge(parts: list[dict]) -> dict:
    first = parts[0]
    for key in ("settings", "base_model_id", "seeds", "profiles"):
        if any(p[key] != first[key] for p in parts):
            raise ValueError(f"the parts differ in {key!r}")
    cells = {}
    for part in parts:
        for cell in cells_from_json(part["cells"]):
            key = (cell.profile, cell.seed, cell.method)
            if key in cells and cells[key].surface_dice != cell.surface_dice:
                raise ValueError(
                    f"{key}: surface Dice {cells[key].surface_dice} in one part, {cell.surface_dice} in another"
                )
            cells.setdefault(key, cell)
    order = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(cells.values(), key=lambda c: (c.seed, first["profiles"].index(c.profile), order[c.method]))
    methods = sorted({c.method for c in merged}, key=order.__getitem__)
    return {
        "parts": [{k: p[k] for k in ("command", "date", "machine", "software_version")} for p in parts],
        "base_model_id": first["base_model_id"],
        "settings": first["settings"],
        "profiles": first["profiles"],
        "methods": {m: METHODS[m] for m in methods},
        "seeds": first["seeds"],
        "simulated": True,
        "cells": cells_to_json(merged),
        "summary": summarise(merged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    try:
        result = merge([json.loads(p.read_text()) for p in args.parts])
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"error: {exc}")
    text, table = json.dumps(result, indent=1), markdown(result["summary"])
    atomic_write(args.output, lambda tmp: tmp.write_text(text))  # the benchmark's own writer: never a half file
    if args.markdown is not None:
        atomic_write(args.markdown, lambda tmp: tmp.write_text(table))
    print(table, end="")
    print(f"({len(result['cells'])} cells from {len(args.parts)} parts in {args.output})")


if __name__ == "__main__":
    main()
