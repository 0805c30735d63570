"""What `--standardize auto` keeps with a model on one head under every T1 profile, and what each mask scores.

Usage:
    python scripts/probe_standardize_shipped.py --head heads/colin27 [--model M] [--seed 0]

A look at what a user sees, not a benchmark: the shipped model trained on every
head under ``heads/``, so no head is held out from it. Each profile's simulated
scan goes through :func:`napari_convlora.selection.iter_plain_and_standardized`
(the rule ``--standardize auto`` runs); the surface Dice of the plain,
head-standardised and brain-standardised masks is printed with the one kept
and the rule's note (confidences and feature distances).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_convlora.inference import run_to_end
from napari_convlora.library import default_model_path
from napari_convlora.metrics import surface_dice
from napari_convlora.model import load_model
from napari_convlora.nifti import load_volume
from napari_convlora.selection import iter_plain_and_standardized
from napari_convlora.simulate import PROFILES, simulate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", type=Path, required=True, help="a folder with t1.nii.gz and mask_consensus.nii.gz")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped source model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = load_model(args.model or default_model_path())
    t1, mask = load_volume(args.head / "t1.nii.gz"), load_volume(args.head / "mask_consensus.nii.gz")
    print("| profile | plain | head | brain | kept | note |\n|---|---|---|---|---|---|")
    for profile in (name for name, p in PROFILES.items() if not p.stress):
        scan, truth = simulate(t1, mask, profile, seed=args.seed)
        choice = run_to_end(iter_plain_and_standardized(base, scan, device="cpu"))
        masks = {"plain": choice.plain, "head": choice.standardized, "brain": choice.brain}
        scores = [f"{surface_dice(m.mask > 0, truth.data > 0, scan.spacing, 1.0):.3f}" for m in masks.values()]
        kept = next(name for name, m in masks.items() if m is choice.kept)
        print(f"| {profile} | {' | '.join(scores)} | {kept} | {choice.note} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
