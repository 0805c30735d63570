"""Score source models on real heads they did not train on, each inference piece on and off.

Usage:
    python scripts/bench_heads.py --heads heads --eval MODEL HEAD [HEAD ...] [--eval MODEL HEAD ...]
                                  [--variants full single-pass no-cleanup] [--precisions float32 bfloat16]
                                  [--tta 1 2 4] [-o results.json]

``heads`` is the folder ``scripts/prepare_heads.py`` writes; every HEAD is a
folder of it (``t1.nii.gz`` scored against ``mask_consensus.nii.gz``), and its
``mask_deepbet`` / ``mask_hdbet``, where present, are scored the same way as
the peers. Variants: ``full`` (two passes, smoothing, clean-up: what ``convlora segment``
does), ``single-pass`` (one pass over the whole head), ``no-cleanup`` (no 3D
clean-up), ``no-smoothing`` (the network's probability thresholded as it is),
``bare`` (one pass, no smoothing, no clean-up), ``standardize`` (``full`` with the
scan's intensities standardised first: ``convlora segment --standardize``),
``standardize-brain`` (then the brain's landmarks too, under that mask: the brain step of
``--standardize auto``, always), ``standardize-auto`` (every way, the mask the rule of
``--standardize auto`` keeps; which one is printed).
Each variant runs in every one of ``--precisions`` (what the network computes
in; ``auto`` as ``convlora segment`` picks it); a row after the first precision
also counts the voxels where its mask differs from the first one's. ``--tta``:
the mirror views averaged per slice (``convlora segment --tta``), each count a row.
Prints one line per (model, head, variant) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_convlora.inference import PRECISIONS, TTA_MIRRORS, run_to_end, segment
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.selection import iter_plain_and_standardized

VARIANTS = {
    "full": {"two_pass": True, "cleanup": True},
    "single-pass": {"two_pass": False, "cleanup": True},
    "no-cleanup": {"two_pass": True, "cleanup": False},
    "no-smoothing": {"two_pass": True, "cleanup": True, "smooth_mm": 0.0},
    "bare": {"two_pass": False, "cleanup": False, "smooth_mm": 0.0},
    "standardize": {"two_pass": True, "cleanup": True, "standardize": True},
    "standardize-brain": {"two_pass": True, "cleanup": True, "standardize": True},  # two runs: see run()
    "standardize-auto": {"two_pass": True, "cleanup": True},  # every way, the rule's choice: see run()
}


def run(model, volume, variant: str, **options):
    """``segment`` as the variant says; ``standardize-auto`` as ``convlora segment --standardize auto``."""
    if variant == "standardize-brain":
        first = segment(model, volume, **options, **VARIANTS[variant])
        second = segment(model, volume, **options, **VARIANTS[variant], brain=first.mask)
        return replace(second, seconds=first.seconds + second.seconds)
    if variant != "standardize-auto":
        return segment(model, volume, **options, **VARIANTS[variant])
    choice = run_to_end(iter_plain_and_standardized(model, volume, **options, **VARIANTS[variant]))
    print(f"  standardize-auto: {choice.note}", flush=True)
    return replace(choice.kept, seconds=choice.seconds)  # what the user waits for


def score(pred: np.ndarray, gt) -> dict:
    figures = evaluate(pred, gt.data > 0, gt.spacing)
    return {k: round(float(v), 4) for k, v in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("--eval", nargs="+", action="append", required=True, metavar="MODEL HEAD")
    parser.add_argument("--variants", nargs="+", default=["full"], choices=list(VARIANTS))
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=list(PRECISIONS))
    parser.add_argument("--tta", nargs="+", type=int, default=[1], choices=list(TTA_MIRRORS))
    parser.add_argument("--no-peers", action="store_true", help="skip scoring deepbet / HD-BET")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    rows = []
    for model_path, *names in args.eval:
        model = load_model(model_path)
        for name in names:
            folder = args.heads / name
            volume, gt = load_volume(folder / "t1.nii.gz"), load_mask(folder / "mask_consensus.nii.gz")
            for variant in args.variants:
                first = None
                for precision, tta in ((p, t) for p in args.precisions for t in args.tta):
                    result = run(model, volume, variant, device="cpu", precision=precision, tta=tta)
                    label = variant if len(args.precisions) == 1 else f"{variant}, {precision}"
                    label += f", tta {tta}" if len(args.tta) > 1 else ""
                    row = {
                        "model": str(model_path),
                        "head": name,
                        "method": f"convlora ({label})",
                        "seconds": round(result.seconds, 1),
                        **score(result.mask, gt),
                    }
                    if first is None:
                        first = result.mask
                    else:
                        row["voxels_differing_from_first"] = int(np.count_nonzero(result.mask != first))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if not args.no_peers:
        for name in sorted({n for _, *names in args.eval for n in names}):
            folder = args.heads / name
            gt = load_mask(folder / "mask_consensus.nii.gz")
            for peer in ("deepbet", "hdbet"):
                path = folder / f"mask_{peer}.nii.gz"
                if path.exists():
                    row = {"model": peer, "head": name, "method": peer, **score(load_mask(path).data > 0, gt)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| head | method | model | Dice | surface Dice @ 1 mm | HD95 mm |\n|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["head"], r["method"])):
        print(
            f"| {r['head']} | {r['method']} | {Path(r['model']).name} | {r['dice']:.3f} | "
            f"{r['surface_dice']:.3f} | {r['hd95_mm']:.1f} |"
        )
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
