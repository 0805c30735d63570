"""Intensity standardisation: a scan's head histogram mapped onto the one the model was trained on.

Scanners differ first in contrast: how far apart CSF, grey and white matter
sit, how bright fat and marrow are (dark when fat-suppressed), how the neck and
field of view weigh in the histogram. The "tissue" scaling of
:func:`~napari_convlora.geometry.scale_intensity` pins one point of the
histogram; a network that never saw the rest of a new scanner's histogram can
still fail (section 2 of BENCHMARKS.md: a fat-suppressed look takes the mask
into the neck). This module pins nine: the percentiles :data:`PERCENTILES` of
the head's voxels (above Otsu's threshold, every second voxel) are mapped
piecewise-linearly onto the mean of the same percentiles over the model's
training heads, as Nyúl and Udupa's histogram standardisation does for MRI
(Magn Reson Med 1999; 2000). No training, no labels, one pass over the volume.

The head's histogram mixes brain with scalp, fat, marrow and neck, whose
contrast varies most between scanners (fat bright at 3 T, dark when
fat-suppressed), so matching it can leave the brain itself off: on the
simulated 3 T profiles it recovered little of the lost accuracy. The second,
optional step (``brain``: a first segmentation's mask) then maps the 10th and
90th percentiles of the brain's voxels onto the training brains' (measured
under their labels): two points, so the map stays gentle where a thick slice
has blurred the brain's histogram (seven points, in a probe, took one such
mask down to 0.39 surface Dice). ``convlora segment --standardize auto`` tries
both steps and keeps one mask by a rule
(:func:`napari_convlora.selection.iter_plain_and_standardized`).

The reference travels in the model file's metadata (``intensity_landmarks``):
``convlora train-source`` writes it; ``scripts/add_shape_prior.py`` adds it (and
the size prior) to a model trained before, weights unchanged. A scan is
standardised only when asked (``convlora segment --standardize``) or when an
adapter was adapted on standardised slices (its metadata says
``"standardize": true``): the model was trained on unstandardised heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from .errors import InputError

METADATA_KEY = "intensity_landmarks"
MODES = ("off", "on", "auto")  # --standardize: never, always, or every way, one mask kept by auto's rule
PERCENTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
BRAIN_PERCENTILES = (10.0, 90.0)
_NO_BRAIN = "this model has no brain intensity landmarks; add them with scripts/add_shape_prior.py"
_MIN_VOXELS = 1000  # fewer head voxels than this: no histogram to speak of, the scan is left as it is


def head_landmarks(scaled: np.ndarray) -> np.ndarray | None:
    """The :data:`PERCENTILES` of the head's voxels of a scaled volume, or None if there is no head to speak of."""
    sample = scaled[::2, ::2, ::2]
    if sample.size == 0 or float(sample.min()) == float(sample.max()):
        return None
    head = sample[sample > threshold_otsu(sample)]
    if head.size < _MIN_VOXELS:
        return None
    return np.percentile(head, PERCENTILES)


def brain_landmarks(scaled: np.ndarray, brain: np.ndarray) -> np.ndarray | None:
    """The :data:`BRAIN_PERCENTILES` of a scaled volume under a brain mask (same grid), eroded by one voxel so
    that the brain's edge, half CSF or skull, does not count; None if too little brain is left."""
    inner = ndimage.binary_erosion(brain > 0)
    if int(inner.sum()) < _MIN_VOXELS:
        return None
    return np.percentile(scaled[inner], BRAIN_PERCENTILES)


@dataclass(frozen=True)
class IntensityReference:
    """Where the training heads' landmarks sit on average (the :data:`PERCENTILES` of their heads), and their
    brains' (the :data:`BRAIN_PERCENTILES` under their labels; None in a model made before 2026-12-05)."""

    values: tuple[float, ...]
    heads: int
    brain: tuple[float, ...] | None = None

    def as_metadata(self) -> dict:
        entry = {
            "percentiles": list(PERCENTILES),
            "values": [round(v, 5) for v in self.values],
            "heads": self.heads,
            "about": "mean percentiles of the training heads' voxels above Otsu's threshold, after the scaling",
        }
        if self.brain is not None:
            entry["brain_percentiles"] = list(BRAIN_PERCENTILES)
            entry["brain_values"] = [round(v, 5) for v in self.brain]
        return entry

    @classmethod
    def from_metadata(cls, metadata: dict, where: str) -> IntensityReference:
        """The reference stored in a model's metadata, or InputError naming ``where`` (the model file)."""
        entry = metadata.get(METADATA_KEY)
        if entry is None:
            raise InputError(
                f"{where}: this model has no intensity landmarks to standardise to; retrain it with this "
                "version or add them with scripts/add_shape_prior.py"
            )
        try:
            values = tuple(float(v) for v in entry["values"])
            percentiles = tuple(float(p) for p in entry["percentiles"])
            heads = int(entry["heads"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: its intensity landmarks are malformed") from None
        if percentiles != PERCENTILES or len(values) != len(PERCENTILES) or not _increasing(values):
            raise InputError(f"{where}: its intensity landmarks are malformed")
        brain = None
        if "brain_values" in entry:
            try:
                brain = tuple(float(v) for v in entry["brain_values"])
                brain_percentiles = tuple(float(p) for p in entry["brain_percentiles"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{where}: its brain intensity landmarks are malformed") from None
            if brain_percentiles != BRAIN_PERCENTILES or len(brain) != len(BRAIN_PERCENTILES) or not _increasing(brain):
                raise InputError(f"{where}: its brain intensity landmarks are malformed")
        return cls(values, heads, brain)

    @classmethod
    def of_model(cls, base, brain: bool = False) -> IntensityReference:
        """The reference of a :class:`~napari_convlora.model.BaseModel` (InputError if it has none, or with
        ``brain`` if it has no brain landmarks)."""
        where = str(base.path or "the model")
        reference = cls.from_metadata(base.metadata, where)
        if brain and reference.brain is None:
            raise InputError(f"{where}: {_NO_BRAIN}")
        return reference


def _increasing(values: Sequence[float]) -> bool:
    v = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.isfinite(v)) and np.all(np.diff(v) >= 0) and v[0] >= 0 and v[-1] <= 1)


def _mean(landmarks: Sequence[np.ndarray | None]) -> tuple[float, ...] | None:
    found = [np.asarray(v, dtype=np.float64) for v in landmarks if v is not None]
    return tuple(float(v) for v in np.mean(found, axis=0)) if found else None


def learn_reference(
    landmarks: Sequence[np.ndarray | None], brains: Sequence[np.ndarray | None] = ()
) -> IntensityReference:
    """The mean landmarks of the training heads (each from :func:`head_landmarks`) and of their brains (each
    from :func:`brain_landmarks`; none given: the reference has no brain landmarks)."""
    values = _mean(landmarks)
    if values is None:
        raise InputError("no training head has a head to take intensity landmarks from")
    return IntensityReference(values, sum(v is not None for v in landmarks), _mean(brains))


def remap_points(found: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The knots and heights of :func:`remap`'s map: ``found`` onto ``target``, (0, 0) below, slope 1 above."""
    xs = np.concatenate([[0.0], found, [1.0]])
    xs = np.maximum.accumulate(xs + np.arange(len(xs)) * 1e-7)  # ties (integer data) made strictly increasing
    ys = np.concatenate([[0.0], target, [min(1.0, target[-1] + 1.0 - found[-1])]])
    return xs, ys


def remap(scaled: np.ndarray, found: np.ndarray, target: np.ndarray) -> None:
    """Piecewise-linear, in place: ``found`` onto ``target``, (0, 0) below, slope 1 above the last (capped at 1)."""
    xs, ys = remap_points(found, target)
    for part in scaled:  # slab by slab: float32 stays float32, no float64 copy of the whole volume
        part[...] = np.interp(part, xs, ys)
    np.clip(scaled, 0.0, 1.0, out=scaled)


def standardize(scaled: np.ndarray, reference: IntensityReference, brain: np.ndarray | None = None) -> np.ndarray:
    """Map a scaled volume's landmarks onto ``reference``'s, in place (float32, values stay in [0, 1]).

    Between landmarks the map is linear; below the first it runs to (0, 0);
    above the last it keeps slope 1 (capped at 1), so the brightest voxels,
    often fat, keep their order and are not stretched. A volume with no head
    to measure is returned unchanged. ``brain`` (a mask on the same grid): then
    the brain's landmarks are mapped onto the reference's brain landmarks the
    same way (InputError if the reference has none; left as it is if the mask
    holds too little brain).
    """
    if brain is not None and reference.brain is None:
        raise InputError(_NO_BRAIN)
    found = head_landmarks(scaled)
    if found is None:
        return scaled
    remap(scaled, found, np.asarray(reference.values, dtype=np.float64))
    inner = None if brain is None else brain_landmarks(scaled, brain)
    if inner is not None:
        remap(scaled, inner, np.asarray(reference.brain, dtype=np.float64))
    return scaled
