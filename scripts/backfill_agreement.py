"""Add the early-head agreement of the source, ``adabn`` and ``mixbn`` models to a benchmark results file.

Usage: python scripts/backfill_agreement.py RESULTS.json --t1 T1 --mask MASK --model WEIGHTS

Benchmark runs from before the agreement of every model was recorded (2026-12-03)
have it only for the adapter methods (their kept epoch's). The missing figures are
deterministic functions of the scan, the slices and the model (none of these
methods trains anything), so they are recomputed here exactly as
``convlora benchmark`` now computes them, and written back into the cells
(atomically). The summary is recomputed with the benchmark's own code.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from napari_convlora.adapt import AdaptConfig
from napari_convlora.benchmark import adapt_with, cells_from_json, early_agreement, summarise, target_slices
from napari_convlora.cli import _json_safe
from napari_convlora.files import atomic_write
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import simulate

UNTRAINED = ("source", "adabn", "mixbn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--t1", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    base = load_model(args.model)
    if base.model_id != result["base_model_id"]:
        raise SystemExit(f"{args.model}: not the base model of {args.results}")
    settings = result["settings"]
    config = AdaptConfig(slices=settings["slices"], epochs=settings["epochs"], lr=settings["lr"], device="cpu")
    volume, mask = load_volume(args.t1), load_mask(args.mask)
    cells = result["cells"]
    for profile, seed in sorted({(c["profile"], c["seed"]) for c in cells}):
        scan, reference = simulate(volume, mask, profile, seed=seed)
        geometry, _, images = target_slices(base, scan, replace(config, seed=seed))
        source = early_agreement(base, base, geometry, images)
        found = {}
        for cell in (c for c in cells if (c["profile"], c["seed"]) == (profile, seed)):
            cell["source_agreement"] = round(source, 5)
            if cell["method"] in UNTRAINED:
                if cell["method"] not in found:
                    adapted = adapt_with(base, scan, reference, cell["method"], replace(config, seed=seed))
                    found[cell["method"]] = early_agreement(adapted.model, base, geometry, images)
                cell["agreement"] = round(found[cell["method"]], 5)
        print(f"{profile} seed {seed}: source agreement {source:.4f}", flush=True)
    result["summary"] = summarise(cells_from_json(cells))
    result["backfilled"] = "source/adabn/mixbn agreement and source_agreement by scripts/backfill_agreement.py"
    text = json.dumps(_json_safe(result), indent=1)
    atomic_write(args.results, lambda tmp: tmp.write_text(text))
    print(f"{args.results}: {len(cells)} cells")


if __name__ == "__main__":
    main()
