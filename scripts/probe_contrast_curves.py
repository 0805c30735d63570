"""Probe: ``convlora train-source`` with random tissue-contrast curves added to the augmentation.

Usage:
    python scripts/probe_contrast_curves.py TRAIN-SOURCE-ARGUMENTS...

The same command as ``convlora train-source`` (all its options), with one
change in :func:`napari_convlora.training.augment`: half of the training crops
are also passed through a random piecewise-linear intensity curve that keeps
the T1 tissue order up to white matter (control points at 0, 0.15, 0.3, 0.45,
0.6 of the scaled image, increasing) and puts fat and marrow anywhere (0.8, 1.0,
1.5: any level, darker than tissue included, as with fat suppression). A probe
for BENCHMARKS.md section 2 ("Contrast curves in training"): the family is
close to the simulator's own contrast maps, so its figures on simulated
scanners flatter it; a held-out real head is the fair check.
"""

from __future__ import annotations

import sys

import numpy as np

from napari_convlora import training
from napari_convlora.cli import main

_augment = training.augment
_KNOTS = np.array([0.0, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5])


def with_contrast_curves(image, mask, rng, crop):
    """The usual augmentation, then (half of the time) a random T1-like contrast curve."""
    img, msk = _augment(image, mask, rng, crop)
    if rng.random() < 0.5:
        tissue = np.cumsum(rng.uniform(0.02, 0.25, 4))
        tissue = tissue / tissue[-1] * rng.uniform(0.45, 0.75)  # CSF < grey < white matter, white at 0.45-0.75
        fat = rng.uniform(0.15, 1.0, 3)
        levels = np.concatenate([[0.0], tissue, fat[:2], [fat[2] * 1.5]])
        img = np.interp(img, _KNOTS, levels).astype(np.float32)
    return img, msk


if __name__ == "__main__":
    training.augment = with_contrast_curves  # in this process: use --workers 0
    sys.exit(main(["train-source", *sys.argv[1:]]))
