"""Probe: ConvLoRA + AdaBN with other settings on simulated profiles of a shared head.

Usage: python scripts/probe_adapt_settings.py MODEL HEAD PROFILES '{}' '{"lr": 1e-3}' ... [--seed N]
(HEAD is a folder name under ../shared/data; PROFILES one name or several joined by commas; each JSON
object overrides AdaptConfig fields). Prints, per profile, surface Dice of the source model, of AdaBN
alone, and of each setting with its per-epoch agreement, then each setting's mean over the profiles.
"""

import json
import sys

import numpy as np
import torch

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.benchmark import adapt_with
from napari_convlora.inference import segment
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import simulate

torch.set_num_threads(1)
args = sys.argv[1:]
seed = 0
if "--seed" in args:
    at = args.index("--seed")
    seed = int(args[at + 1])
    del args[at : at + 2]
base, head, names, settings = load_model(args[0]), args[1], args[2].split(","), args[3:]
volume = load_volume(f"../shared/data/{head}/t1.nii.gz")
mask = load_mask(f"../shared/data/{head}/mask_consensus.nii.gz")
results: dict[str, list[float]] = {}


def score(model, scan, reference, adapter=None) -> dict:
    return evaluate(segment(model, scan, adapter, device="cpu").mask, reference.data, scan.spacing)


for name in names:
    scan, reference = simulate(volume, mask, name, seed=seed)
    for label, model in (("source model", base), ("adabn", None)):
        if model is None:
            model = adapt_with(base, scan, reference, "adabn", AdaptConfig(device="cpu", seed=seed)).model
        s = score(model, scan, reference)
        results.setdefault(label, []).append(s["surface_dice"])
        print(name, label, "sDice", round(s["surface_dice"], 3), "dice", round(s["dice"], 3), flush=True)
    for overrides in settings:
        done = run_adaptation(base, scan, AdaptConfig(device="cpu", seed=seed, **json.loads(overrides)))
        s = score(base, scan, reference, done.adapter)
        results.setdefault(overrides, []).append(s["surface_dice"])
        agreements = [round(a, 3) for a in done.agreements]
        print(name, overrides, "sDice", round(s["surface_dice"], 3), "dice", round(s["dice"], 3),
              "agreement", agreements, "best epoch", done.best_epoch, flush=True)  # fmt: skip
print("mean over", ",".join(names))
for label, values in results.items():
    print(f"  {label}: {np.mean(values):.3f}", flush=True)
