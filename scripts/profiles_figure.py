"""Draw one sagittal slice of a head (the sample by default) under every simulated scanner profile.

Usage: python scripts/profiles_figure.py [--seed 0] [--out docs/profiles.png] [--t1 T1 --mask MASK]
Each panel is what the shipped model sees (RAS, 1 mm in-plane, scaled its way, cropped), with the
reference brain mask outline in red.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.io import imsave

from napari_convlora.geometry import plan
from napari_convlora.library import SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume
from napari_convlora.simulate import PROFILES, simulate

ROOT = Path(__file__).resolve().parent.parent


def panel(volume, mask, scaling: str) -> np.ndarray:
    geometry, scaled = plan(volume, scaling)
    images = geometry.to_model(scaled)
    masks = geometry.to_model(geometry.to_ras(mask.data).astype(np.float32)) > 0.5
    index = int(np.argmax(masks.sum(axis=(1, 2)) > 0) + 0.4 * np.count_nonzero(masks.any(axis=(1, 2))))
    rgb = np.repeat(images[index][..., None], 3, axis=2)
    rgb[masks[index] ^ ndimage.binary_erosion(masks[index])] = (1.0, 0.0, 0.0)
    return np.rot90(rgb)  # superior up, anterior right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "profiles.png")
    parser.add_argument("--t1", type=Path, default=ROOT / "resources" / "sample" / "colin27_t1.nii.gz")
    parser.add_argument("--mask", type=Path, default=ROOT / "resources" / "sample" / "colin27_mask_consensus.nii.gz")
    args = parser.parse_args()
    volume, mask = load_volume(args.t1), load_mask(args.mask)
    scaling = load_model(SOURCE_MODEL).intensity_scaling
    panels = [panel(*simulate(volume, mask, name, seed=args.seed), scaling) for name in PROFILES]
    h, w = max(p.shape[0] for p in panels), max(p.shape[1] for p in panels)
    panels = [np.pad(p, ((0, h - p.shape[0]), (0, w - p.shape[1]), (0, 0))) for p in panels]
    columns = 4
    panels += [np.zeros_like(panels[0])] * (-len(panels) % columns)
    rows = [np.concatenate(panels[i : i + columns], axis=1) for i in range(0, len(panels), columns)]
    imsave(args.out, (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8), check_contrast=False)
    print(f"{args.out}: panels in order {', '.join(PROFILES)} ({columns} per row)")


if __name__ == "__main__":
    main()
