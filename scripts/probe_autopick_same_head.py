"""Diagnosis of auto-pick: does it find the scanner when adapters and scan come from the same head?

Usage: python scripts/probe_autopick_same_head.py [--folder out/colin_adapters]
Makes one default adapter per simulated profile on the shared Colin27 head (seed 0; kept in
--folder and reused), then lets the default criterion pick for the same head under seeds 1 and 2.
Also prints where the brain's intensities fall after the model's intensity scaling on both shared
heads: the simulated profiles map *scaled* intensity, so heads whose tissues sit elsewhere on that
scale get a different contrast under the same profile name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.adapters import save_adapter
from napari_convlora.choose import SOURCE, choose_adapter
from napari_convlora.geometry import scale_intensity
from napari_convlora.library import SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.nifti import load_volume
from napari_convlora.simulate import PROFILES, SOURCE_PROFILE, simulate

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("out/colin_adapters"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for head in ("colin27", "mni152"):
        scaled = scale_intensity(load_volume(DATA / head / "t1.nii.gz").data)
        brain = load_volume(DATA / head / "mask_consensus.nii.gz").data > 0
        print(
            f"{head}: brain intensity after scaling, 10/50/90th percentiles",
            np.round(np.quantile(scaled[brain], [0.1, 0.5, 0.9]), 2),
        )
    base = load_model(SOURCE_MODEL)
    t1 = load_volume(DATA / "colin27" / "t1.nii.gz")
    args.folder.mkdir(parents=True, exist_ok=True)
    for profile in PROFILES:
        path = args.folder / f"{profile}.safetensors"
        if not path.exists():
            scan, _ = simulate(t1, None, profile, seed=0)
            save_adapter(run_adaptation(base, scan, AdaptConfig(device="cpu"), name=profile).adapter, path)
    files = sorted(args.folder.glob("*.safetensors"))
    right = total = 0
    for seed in (1, 2):
        for profile in PROFILES:
            scan, _ = simulate(t1, None, profile, seed=seed)
            label = choose_adapter(base, scan, files, device="cpu").label
            ok = label == profile or (profile == SOURCE_PROFILE and label == SOURCE)
            right, total = right + ok, total + 1
            print(f"seed {seed} {profile:13s} -> {label:13s} {'right' if ok else 'WRONG'}", flush=True)
    print(f"{right} of {total} right")


if __name__ == "__main__":
    main()
