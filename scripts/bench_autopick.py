"""How well `--adapter auto` picks: the confusion matrix over simulated scanners, and what a pick costs.

Usage:
  python scripts/bench_autopick.py --t1 ../shared/data/colin27/t1.nii.gz \
      --mask ../shared/data/colin27/mask_consensus.nii.gz -o out/autopick.json [--markdown out/autopick.md]

The head is put through every simulated profile (seeds 0 1 2 by default); each
criterion of :func:`napari_convlora.choose.choose_adapter` picks among the source
model and the library's adapters (default: the built-ins, made from the MNI152
head, so a Colin27 head is one they never saw). A pick is right when it names
the scan's profile; for the source profile the source model counts as right too.
Every picked model, the source model and the scan's own profile adapter segment
the scan, and surface Dice against the carried mask says what the pick cost or
gained. Prints one line per scan and criterion, then the confusion matrices.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_convlora.adapters import Adapter, load_adapter
from napari_convlora.choose import CRITERIA, SOURCE, choose_adapter
from napari_convlora.inference import segment
from napari_convlora.library import ADAPTER_SUFFIX, BUILTIN_ADAPTERS, SOURCE_MODEL
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_volume
from napari_convlora.selection import accepted_by_confidence, mask_confidence
from napari_convlora.simulate import PROFILES, SOURCE_PROFILE, simulate

SLACK = 0.01  # a pick may cost at most this much surface Dice against the source model (the bar)


def is_right(profile: str, label: str) -> bool:
    return label == profile or (profile == SOURCE_PROFILE and label == SOURCE)


def run(args: argparse.Namespace) -> dict:
    base = load_model(args.model)
    t1, mask = load_volume(args.t1), load_volume(args.mask)
    files = sorted(args.adapters.glob(f"*{ADAPTER_SUFFIX}"))
    rows = []
    for seed in args.seeds:
        for profile in args.profiles:
            scan, reference = simulate(t1, mask, profile, seed=seed)
            cache: dict[str, tuple[float, float]] = {}

            def scored(label: str, adapter: Adapter | None, scan=scan, reference=reference, cache=cache):
                """(surface Dice, mask confidence) of the scan segmented with ``adapter``, once per label."""
                if label not in cache:
                    result = segment(base, scan, adapter, device=args.device)
                    figures = evaluate(result.mask, reference.data, scan.spacing, args.tolerance)
                    cache[label] = (figures["surface_dice"], mask_confidence(result.probability, result.mask))
                return cache[label]

            own = args.adapters / f"{profile}{ADAPTER_SUFFIX}"
            for criterion in args.criteria:
                start = time.perf_counter()
                choice = choose_adapter(base, scan, files, device=args.device, criterion=criterion)
                seconds = time.perf_counter() - start
                source, source_confidence = scored(SOURCE, None)
                picked, picked_confidence = scored(choice.label, choice.adapter)
                # what the do-no-harm gate of adaptation would make of the pick (selection.GATES["confidence"])
                gated = picked if accepted_by_confidence(picked_confidence, source_confidence) else source
                row = {
                    "seed": seed,
                    "profile": profile,
                    "criterion": criterion,
                    "picked": choice.label,
                    "right": is_right(profile, choice.label),
                    "scores": {k: round(v, 4) for k, v in choice.scores.items()},
                    "pick_seconds": round(seconds, 2),
                    "surface_dice_source": round(source, 4),
                    "surface_dice_picked": round(picked, 4),
                    "confidence_source": round(source_confidence, 5),
                    "confidence_picked": round(picked_confidence, 5),
                    "surface_dice_gated": round(gated, 4),
                }
                if own.is_file():
                    row["surface_dice_own_adapter"] = round(scored(profile, load_adapter(own))[0], 4)
                rows.append(row)
                print(
                    f"seed {seed} {profile:13s} {criterion:9s} picked {choice.label:13s} "
                    f"{'right' if row['right'] else 'WRONG'}  sDice source {source:.3f} picked {picked:.3f} "
                    f"own {row.get('surface_dice_own_adapter', float('nan')):.3f}  ({seconds:.1f} s)",
                    flush=True,
                )
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}


def summary(rows: list[dict], criteria: list[str]) -> str:
    """Markdown: per criterion, accuracy, worst cost against the source model, and the confusion matrix."""
    lines = []
    for criterion in criteria:
        mine = [r for r in rows if r["criterion"] == criterion]
        profiles = list(dict.fromkeys(r["profile"] for r in mine))
        labels = [SOURCE, *(p for p in profiles if p != SOURCE_PROFILE)]
        labels += sorted({r["picked"] for r in mine} - set(labels))
        costs = np.array([r["surface_dice_picked"] - r["surface_dice_source"] for r in mine])
        worse = int((costs < -SLACK).sum())
        lines += [
            f"**{criterion}** ({CRITERIA[criterion]}): {sum(r['right'] for r in mine)}/{len(mine)} right; "
            f"picked minus source surface Dice: mean {costs.mean():+.3f}, worst {costs.min():+.3f}; "
            f"{worse} of {len(mine)} scans worse than the source model by more than {SLACK}.",
        ]
        gated = np.array(
            [r["surface_dice_gated"] - r["surface_dice_source"] for r in mine if "surface_dice_gated" in r]
        )
        if len(gated):
            lines += [
                "",
                f"With the confidence gate on the pick (kept only if its whole-volume mask is more confident than "
                f"the source model's): mean {gated.mean():+.3f}, worst {gated.min():+.3f}; "
                f"{int((gated < -SLACK).sum())} of {len(gated)} scans worse by more than {SLACK}.",
            ]
        lines += [
            "",
            "| scan profile \\ picked | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for profile in profiles:
            counts = [sum(r["picked"] == label for r in mine if r["profile"] == profile) for label in labels]
            lines.append(f"| {profile} | " + " | ".join(str(c) if c else "" for c in counts) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=SOURCE_MODEL)
    parser.add_argument("--adapters", type=Path, default=BUILTIN_ADAPTERS, help="folder of candidate adapters")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results (.json)")
    parser.add_argument("--markdown", type=Path, help="also write the summary here (.md)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args)
    text = summary(result["rows"], args.criteria)
    result["summary"] = text
    args.output.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
