"""A size prior for label-free adaptation: how much brain a sagittal slice holds at each lateral position.

Adapting on a handful of unlabeled slices can drift two ways no label-free
loss sees: the mask collapses, or it leaks (into the neck, the eyes, the
scalp). Both change the brain's area in a slice far beyond what heads vary by.
The prior, learnt from the source model's own training masks, is that area
(mm^2, in the model's 1 mm slices) as a function of where the slice lies
across the head from left to right (0 to 1 over the sagittal slices the model
reads), per bin of that position: the mean over the training heads and their
spread. The adaptation term is the KL divergence between two Gaussians of that
spread, one at the predicted area and one at the prior's mean: half the squared
z-score, averaged over the batch's slices.

The prior travels in the model file's metadata (``shape_prior``):
``convlora train-source`` writes it; ``scripts/add_shape_prior.py`` adds it to a
model trained before, from the heads its metadata names (weights unchanged, so
the model id is the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .geometry import PLANE_SPACING_MM

METADATA_KEY = "shape_prior"
BINS = 20
MIN_SPREAD_SHARE = 0.1  # the spread is at least 10% of the mean area: a few heads understate how people vary
MIN_SPREAD_MM2 = 200.0  # and at least 2 cm^2, for the near-empty slices at the sides


def slice_positions(indices: Sequence[int], n_slices: int) -> np.ndarray:
    """Where slices lie across the head, 0 (first sagittal slice the model reads) to 1 (last): slice centres."""
    return (np.asarray(indices, dtype=np.float64) + 0.5) / max(int(n_slices), 1)


def _bins(positions: np.ndarray, bins: int) -> np.ndarray:
    """The bin (0 to ``bins`` - 1) each position in [0, 1] falls in."""
    return np.clip((np.asarray(positions) * bins).astype(int), 0, bins - 1)


@dataclass(frozen=True)
class ShapePrior:
    """Brain area per sagittal slice (mm^2): mean and spread per bin of lateral position."""

    mean_mm2: tuple[float, ...]
    spread_mm2: tuple[float, ...]
    heads: int

    def as_metadata(self) -> dict:
        return {
            "bins": len(self.mean_mm2),
            "mean_mm2": [round(v, 1) for v in self.mean_mm2],
            "spread_mm2": [round(v, 1) for v in self.spread_mm2],
            "heads": self.heads,
            "about": "brain area per sagittal model slice by lateral position, from the training masks",
        }

    @classmethod
    def from_metadata(cls, metadata: dict, where: str) -> ShapePrior:
        """The prior stored in a model's metadata, or InputError naming ``where`` (the model file)."""
        prior = metadata.get(METADATA_KEY)
        if prior is None:
            raise InputError(
                f"{where}: this model has no shape prior; retrain it with this version "
                "or add one with scripts/add_shape_prior.py"
            )
        try:
            mean, spread = (tuple(float(v) for v in prior[key]) for key in ("mean_mm2", "spread_mm2"))
            heads = int(prior["heads"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: its shape prior metadata is malformed") from None
        if not mean or len(mean) != len(spread) or not all(s > 0 for s in spread) or not all(np.isfinite(mean)):
            raise InputError(f"{where}: its shape prior metadata is malformed")
        return cls(mean, spread, heads)

    @classmethod
    def of_model(cls, model) -> ShapePrior:
        """The prior of a :class:`~napari_convlora.model.BaseModel`, or InputError naming its file."""
        return cls.from_metadata(model.metadata, str(model.path or "the base model"))

    def expected(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of the area at each position (the bin it falls in)."""
        bins = _bins(positions, len(self.mean_mm2))
        return np.asarray(self.mean_mm2)[bins], np.asarray(self.spread_mm2)[bins]

    def loss(self, logits: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """Mean over the (N, 1, H, W) batch of KL(N(area, s) || N(mean, s)) = ((area - mean) / s)^2 / 2."""
        mean, spread = (torch.as_tensor(a, dtype=logits.dtype, device=logits.device) for a in self.expected(positions))
        area = torch.sigmoid(logits).sum(dim=(1, 2, 3)) * PLANE_SPACING_MM**2
        return (0.5 * ((area - mean) / spread) ** 2).mean()


def learn_shape_prior(mask_stacks: Sequence[np.ndarray]) -> ShapePrior:
    """The prior from the training heads' masks, each a (n_slices, H, W) stack in model space (0/1)."""
    if not mask_stacks:
        raise InputError("no masks to learn a shape prior from")
    per_head = []
    for stack in mask_stacks:
        area = np.asarray(stack, dtype=np.float64).sum(axis=(1, 2)) * PLANE_SPACING_MM**2
        bins = _bins(slice_positions(range(len(area)), len(area)), BINS)
        counts = np.bincount(bins, minlength=BINS)
        per_head.append(np.bincount(bins, weights=area, minlength=BINS) / np.maximum(counts, 1))
    areas = np.stack(per_head)
    mean = areas.mean(axis=0)
    spread = areas.std(axis=0, ddof=1) if len(areas) > 1 else np.zeros(BINS)
    spread = np.maximum(spread, np.maximum(MIN_SPREAD_SHARE * mean, MIN_SPREAD_MM2))
    return ShapePrior(tuple(float(v) for v in mean), tuple(float(v) for v in spread), len(areas))
