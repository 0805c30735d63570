"""The map a scan's scaled intensities go through before the model reads them, as one monotone curve.

Two things bring a new scanner's contrast to the model without changing a
weight: landmark standardisation (:mod:`napari_convlora.standardize`, percentiles
of the head, then of the brain, mapped piecewise-linearly onto the training
heads') and a curve learnt towards the model's scanner reference
(:mod:`napari_convlora.intensity_curve`). Both are monotone piecewise-linear maps
of [0, 1] onto [0, 1], so either is an :class:`IntensityCurve`: knots and their
heights. That is what an intensity adapter file stores
(:mod:`napari_convlora.adapters`): the map chosen on one scan of a scanner,
applied as it is to the scanner's other scans, as one ConvLoRA adapter is.

Only numpy here: the planner (:mod:`napari_convlora.geometry`) and the adapter
files read curves without reaching the network's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .standardize import IntensityReference, brain_landmarks, head_landmarks, remap, remap_points


@dataclass(frozen=True)
class IntensityCurve:
    """A piecewise-linear monotone map of scaled intensities: ``heights`` at ``knots`` (None: equal pieces of
    [0, 1], filled in). It starts at (0, 0); above the last knot it stays at the last height."""

    heights: tuple[float, ...]
    knots: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        h = np.asarray(self.heights, dtype=np.float64)
        if len(h) < 2 or not np.all(np.isfinite(h)) or h[0] != 0 or np.any(np.diff(h) < 0) or h[-1] > 1:
            raise ValueError("an intensity curve needs two or more finite, non-decreasing heights from 0 to at most 1")
        object.__setattr__(self, "heights", tuple(float(v) for v in h))  # plain floats: JSON, equality
        if self.knots is None:  # frozen: set once, so that equal maps compare equal however they were made
            object.__setattr__(self, "knots", tuple(float(k) for k in np.linspace(0.0, 1.0, len(h))))
        k = np.asarray(self.knots, dtype=np.float64)
        object.__setattr__(self, "knots", tuple(float(v) for v in k))
        if len(k) != len(h) or not np.all(np.isfinite(k)) or k[0] != 0 or k[-1] < 1 or np.any(np.diff(k) <= 0):
            raise ValueError("an intensity curve's knots must rise strictly from 0 to 1 or more, one per height")

    def apply(self, scaled: np.ndarray) -> np.ndarray:
        """Map a scaled volume (values in [0, 1]) through the curve, in place, slab by slab (float32 stays)."""
        for part in scaled:
            part[...] = np.interp(part, self.knots, self.heights)
        return scaled

    def as_metadata(self) -> dict:
        return {"knots": list(self.knots), "heights": list(self.heights)}

    @classmethod
    def from_metadata(cls, entry: object, where: str) -> IntensityCurve:
        """The curve stored in a file's metadata (:meth:`as_metadata`), or InputError naming ``where``."""
        try:
            knots = tuple(float(k) for k in entry["knots"])
            heights = tuple(float(h) for h in entry["heights"])
            return cls(heights, knots)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: its intensity curve is malformed") from None


IDENTITY = IntensityCurve((0.0, 1.0))


def landmark_curve(
    scaled: np.ndarray, reference: IntensityReference, brain: np.ndarray | None = None
) -> IntensityCurve:
    """What :func:`~napari_convlora.standardize.standardize` does to this scaled volume (RAS, as the planner
    has it), as one curve: the head's map, composed with the brain's when ``brain`` (a mask on the same grid)
    is given. The identity if the volume has no head to measure."""
    found = head_landmarks(scaled)
    if found is None:
        return IDENTITY
    head_x, head_y = remap_points(found, np.asarray(reference.values, dtype=np.float64))
    inner = None
    if brain is not None:
        if reference.brain is None:
            raise ValueError("the reference has no brain landmarks")
        mapped = scaled.copy()
        remap(mapped, found, np.asarray(reference.values, dtype=np.float64))
        inner = brain_landmarks(mapped, brain)  # measured after the head's map, as standardize() measures them
    if inner is None:
        return IntensityCurve(tuple(np.clip(head_y, 0.0, 1.0)), tuple(head_x))
    brain_x, brain_y = remap_points(inner, np.asarray(reference.brain, dtype=np.float64))
    # the composition's kinks: the head map's knots, and where the head map reaches the brain map's knots
    knots = np.union1d(head_x, np.interp(brain_x, head_y, head_x))
    heights = np.clip(np.interp(np.clip(np.interp(knots, head_x, head_y), 0.0, 1.0), brain_x, brain_y), 0.0, 1.0)
    return IntensityCurve(tuple(heights), tuple(knots))
