"""A scanner's signature in the encoder's feature statistics, learnt over several heads.

`--adapter auto` names the scanner of a scan by comparing the scan's feature
statistics at every encoder batch norm with the statistics each candidate
carries. An adapter's own AdaBN statistics come from one head, so that
comparison mixes the scanner with the head's anatomy (neck, scalp, field of
view): on real heads it named the simulated scanner about half the time
(``scripts/probe_autopick_loho.py``, BENCHMARKS section 3). A
:class:`ScannerReference` is learnt instead from several heads put through the
candidate's scanner profile: per channel, the mean over heads of the feature
mean and log-variance, and how much each varies from head to head. A scan is
then scored by its squared distance from those means, each channel divided by
its head-to-head spread: a channel that moves with anatomy counts little, one
that moves only with the scanner counts much. Every candidate is measured with
the source model's spreads (:meth:`ScannerReference.with_spreads_of`). The spreads are shrunk half-way
to their layer's mean, since a handful of heads gives noisy variances.

Stored as JSON in the metadata of the model file (the source model's
reference, through the source profile) and of each built-in adapter file
(``scripts/add_scanner_reference.py``), never pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import encoder_batchnorms
from .errors import InputError
from .model import SCANNER_REFERENCE_KEY as METADATA_KEY
from .model import BaseModel, UNet2D

SHRINK = 0.5  # how far each channel's head-to-head variance is pulled towards its layer's mean

Moments = list[tuple[np.ndarray, np.ndarray]]  # per encoder BN: per-channel feature mean and variance


def with_encoder_bn_inputs(
    unet: UNet2D, images: torch.Tensor, measure: Callable[[torch.nn.BatchNorm2d, torch.Tensor], None]
) -> None:
    """Encode ``images`` (eval mode, no gradients); ``measure(bn, x)`` gets each encoder BN's input, in double."""
    hooks = [
        bn.register_forward_pre_hook(lambda module, inputs: measure(module, inputs[0].double()))
        for _, bn in encoder_batchnorms(unet)
    ]
    try:
        unet.eval()
        with torch.no_grad():
            unet.encode(images)
    finally:
        for hook in hooks:
            hook.remove()


def feature_moments(unet: UNet2D, images: torch.Tensor) -> Moments:
    """Per encoder BN: the per-channel mean and unbiased variance (+ the BN's eps) of its input over ``images``."""
    found: list[tuple[list[float], list[float]]] = []

    def measure(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> None:
        # Python floats, not small arrays: those kept alive between big activations pin glibc's heap.
        found.append((x.mean(dim=(0, 2, 3)).tolist(), (x.var(dim=(0, 2, 3)) + bn.eps).tolist()))

    with_encoder_bn_inputs(unet, images, measure)
    return [(np.asarray(mean), np.asarray(var)) for mean, var in found]


@dataclass(frozen=True)
class LayerReference:
    mean: np.ndarray  # per channel: the feature mean, averaged over heads
    mean_spread: np.ndarray  # its head-to-head variance, shrunk
    log_var: np.ndarray  # the log feature variance, averaged over heads
    log_var_spread: np.ndarray


@dataclass(frozen=True)
class ScannerReference:
    heads: tuple[str, ...]  # what it was learnt from (names only), for the reason shown to the user
    layers: tuple[LayerReference, ...]  # one per encoder BN

    def distance(self, moments: Moments) -> float:
        """Mean over layers of the channel mean of the spread-weighted squared distances (mean and log-variance)."""
        if len(moments) != len(self.layers):
            raise ValueError(f"{len(moments)} layers of statistics for a reference of {len(self.layers)}")
        values = []
        for (mean, var), ref in zip(moments, self.layers, strict=True):
            parts = (mean - ref.mean) ** 2 / ref.mean_spread + (np.log(var) - ref.log_var) ** 2 / ref.log_var_spread
            values.append(float(np.mean(parts)))
        return float(np.mean(values))

    def with_spreads_of(self, other: ScannerReference) -> ScannerReference:
        """This reference's means, ``other``'s head-to-head spreads.

        `--adapter auto` measures every candidate with the source model's spreads:
        one metric for all, as linear discriminant analysis shares one covariance
        between its classes. With each candidate's own spreads, a scanner whose
        features vary more from head to head (a strong bias field) draws scans
        of other scanners to itself (BENCHMARKS section 3).
        """
        layers = [
            LayerReference(mine.mean, theirs.mean_spread, mine.log_var, theirs.log_var_spread)
            for mine, theirs in zip(self.layers, other.layers, strict=True)
        ]
        return ScannerReference(self.heads, tuple(layers))

    def as_metadata(self) -> dict:
        keys = ("mean", "mean_spread", "log_var", "log_var_spread")
        return {
            "heads": list(self.heads),
            "shrink": SHRINK,
            "layers": [{key: getattr(layer, key).tolist() for key in keys} for layer in self.layers],
        }


def learn_reference(per_head: Sequence[Moments], heads: Sequence[str]) -> ScannerReference:
    """The reference of one scanner from the feature moments of at least two heads seen through it."""
    if len(per_head) < 2 or len(per_head) != len(heads):
        raise ValueError("a scanner reference needs the moments of two or more heads, and their names")
    layers = []
    for layer in zip(*per_head, strict=True):
        means = np.stack([mean for mean, _ in layer])
        log_vars = np.log(np.stack([var for _, var in layer]))
        layers.append(LayerReference(means.mean(0), _spread(means), log_vars.mean(0), _spread(log_vars)))
    return ScannerReference(tuple(heads), tuple(layers))


def _spread(values: np.ndarray) -> np.ndarray:
    variance = values.var(0, ddof=1)
    return (1 - SHRINK) * variance + SHRINK * variance.mean() + 1e-12


def from_batchnorms(unet: UNet2D, spreads: ScannerReference) -> ScannerReference:
    """A one-head reference for a candidate that carries none: its BN statistics, ``spreads``' spreads.

    An adapter made by ``convlora adapt`` on one scan has only its AdaBN
    statistics; the head-to-head spread of each channel is borrowed from the
    source model's reference, so that every candidate is scored on one scale.
    """
    layers = []
    for (_, bn), ref in zip(encoder_batchnorms(unet), spreads.layers, strict=True):
        mean = bn.running_mean.detach().cpu().double().numpy().copy()  # the U-Net may sit on a GPU
        var = (bn.running_var.detach().cpu().double() + bn.eps).numpy()
        layers.append(LayerReference(mean, ref.mean_spread, np.log(var), ref.log_var_spread))
    return ScannerReference(("its own statistics",), tuple(layers))


def reference_from_metadata(where: object, metadata: dict, unet: UNet2D) -> ScannerReference | None:
    """The reference a model or adapter file carries (None if it carries none), checked against ``unet``'s BNs."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    channels = [bn.num_features for _, bn in encoder_batchnorms(unet)]
    problem = f"{where}: its {METADATA_KEY!r} metadata"
    if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list) or len(raw["layers"]) != len(channels):
        raise InputError(f"{problem} does not have one entry per encoder batch norm ({len(channels)})")
    heads = raw.get("heads")
    if not isinstance(heads, list) or len(heads) < 2 or not all(isinstance(h, str) for h in heads):
        raise InputError(f"{problem} does not name the two or more heads it was learnt from")
    layers, keys = [], ("mean", "mean_spread", "log_var", "log_var_spread")
    for entry, width in zip(raw["layers"], channels, strict=True):
        values = [entry.get(key) if isinstance(entry, dict) else None for key in keys]
        if not all(isinstance(v, list) and all(_is_number(x) for x in v) for v in values):
            raise InputError(f"{problem} has a layer without numeric mean, log_var and spreads")
        arrays = [np.asarray(v, dtype=float) for v in values]
        wrong = any(a.shape != (width,) or not np.isfinite(a).all() for a in arrays)
        if wrong or (arrays[1] <= 0).any() or (arrays[3] <= 0).any():
            raise InputError(f"{problem} has a layer of the wrong size, non-finite values or spreads that are not > 0")
        layers.append(LayerReference(*arrays))
    return ScannerReference(tuple(heads), tuple(layers))


def required_reference(base: BaseModel, purpose: str) -> ScannerReference:
    """The reference ``base``'s file carries, or an InputError naming the file and ``purpose`` if none."""
    where = base.path or "the model"
    found = reference_from_metadata(where, base.metadata, base.unet)
    if found is None:
        raise InputError(
            f"{where}: carries no scanner reference, which {purpose} needs (scripts/add_scanner_reference.py adds one)"
        )
    return found


def _is_number(value: object) -> bool:
    """A JSON number that fits a float (not a bool, a string or an integer too big for a double)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) < 2**1023


def summary(raw: object) -> object:
    """What a listing shows of a file's reference: its heads and layer count, not thousands of numbers."""
    if not isinstance(raw, dict):
        return "(not a scanner reference)"
    layers = raw.get("layers")
    return {"heads": raw.get("heads"), "layers": len(layers) if isinstance(layers, list) else None}
