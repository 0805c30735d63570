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
from skimage.filters import threshold_otsu

from .errors import InputError

METADATA_KEY = "intensity_landmarks"
MODES = ("off", "on", "auto")  # --standardize: never, always, or both ways keeping the surer mask
PERCENTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
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


@dataclass(frozen=True)
class IntensityReference:
    """Where the training heads' landmarks sit on average (the :data:`PERCENTILES` of their heads)."""

    values: tuple[float, ...]
    heads: int

    def as_metadata(self) -> dict:
        return {
            "percentiles": list(PERCENTILES),
            "values": [round(v, 5) for v in self.values],
            "heads": self.heads,
            "about": "mean percentiles of the training heads' voxels above Otsu's threshold, after the scaling",
        }

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
        return cls(values, heads)

    @classmethod
    def of_model(cls, base) -> IntensityReference:
        """The reference of a :class:`~napari_convlora.model.BaseModel` (InputError if it has none)."""
        return cls.from_metadata(base.metadata, str(base.path or "the model"))


def _increasing(values: Sequence[float]) -> bool:
    v = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.isfinite(v)) and np.all(np.diff(v) >= 0) and v[0] >= 0 and v[-1] <= 1)


def learn_reference(landmarks: Sequence[np.ndarray]) -> IntensityReference:
    """The mean landmarks of the training heads (each from :func:`head_landmarks`)."""
    found = [np.asarray(v, dtype=np.float64) for v in landmarks if v is not None]
    if not found:
        raise InputError("no training head has a head to take intensity landmarks from")
    return IntensityReference(tuple(float(v) for v in np.mean(found, axis=0)), len(found))


def standardize(scaled: np.ndarray, reference: IntensityReference) -> np.ndarray:
    """Map a scaled volume's landmarks onto ``reference``'s, in place (float32, values stay in [0, 1]).

    Between landmarks the map is linear; below the first it runs to (0, 0);
    above the last it keeps slope 1 (capped at 1), so the brightest voxels,
    often fat, keep their order and are not stretched. A volume with no head
    to measure is returned unchanged.
    """
    found = head_landmarks(scaled)
    if found is None:
        return scaled
    ref = np.asarray(reference.values, dtype=np.float64)
    xs = np.concatenate([[0.0], found, [1.0]])
    xs = np.maximum.accumulate(xs + np.arange(len(xs)) * 1e-7)  # ties (integer data) made strictly increasing
    ys = np.concatenate([[0.0], ref, [min(1.0, ref[-1] + 1.0 - found[-1])]])
    for part in scaled:  # slab by slab: float32 stays float32, no float64 copy of the whole volume
        part[...] = np.interp(part, xs, ys)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return scaled
