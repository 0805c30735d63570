"""Probe: ConvLoRA + AdaBN with other settings on one simulated profile of a shared head.

Usage: python scripts/probe_adapt_settings.py MODEL HEAD PROFILE '{}' '{"lr": 1e-3}' ...
(HEAD is a folder name under ../shared/data; each JSON object overrides AdaptConfig fields).
Prints surface Dice, Dice and the per-epoch agreement for each setting.
"""

import json
import sys

import torch

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.inference import segment
from napari_convlora.metrics import evaluate
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import simulate

torch.set_num_threads(1)
base, head, name = load_model(sys.argv[1]), sys.argv[2], sys.argv[3]
volume = load_volume(f"../shared/data/{head}/t1.nii.gz")
mask = load_mask(f"../shared/data/{head}/mask_consensus.nii.gz")
scan, reference = simulate(volume, mask, name, seed=0)
source = evaluate(segment(base, scan, device="cpu").mask, reference.data, scan.spacing)
print(name, "source model", "sDice", round(source["surface_dice"], 3), "dice", round(source["dice"], 3), flush=True)
for overrides in sys.argv[4:]:
    done = run_adaptation(base, scan, AdaptConfig(device="cpu", **json.loads(overrides)))
    scores = evaluate(segment(base, scan, done.adapter, device="cpu").mask, reference.data, scan.spacing)
    agreements = [round(a, 3) for a in done.agreements]
    print(name, overrides, "sDice", round(scores["surface_dice"], 3), "dice", round(scores["dice"], 3),
          "agreement", agreements, "best epoch", done.best_epoch, flush=True)  # fmt: skip
