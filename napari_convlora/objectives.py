"""Label-free adaptation objectives beyond the paper's early-head self-training.

All of them but the first train the same encoder adapters on the same handful
of unlabeled target slices; they differ in what tells the adapters which way to move:

- ``intensity`` (the default of ``convlora adapt`` and of the widget's Adapt):
  no adapter is trained. The scan is read as it is, standardised to the training
  heads' landmarks, and through an intensity curve learnt towards the model's
  scanner reference; ``--standardize auto``'s rule keeps one
  (:func:`napari_convlora.selection.iter_plain_and_standardized`), and the map
  it read becomes an ``intensity`` adapter (:mod:`napari_convlora.intensity_map`).
  It is the default because it recovered the most of the accuracy lost to the
  simulated scanners without labels (BENCHMARKS.md section 2), where every
  trained adapter recovered at most about a quarter.

- ``feature-stats``: the target's per-channel mean and standard deviation at the
  input of every encoder batch norm should be the *source* statistics stored in
  those batch norms. The adapters then absorb the scanner shift, instead of the
  statistics being re-estimated from a few slices (AdaBN), which on a new head
  also changes what the decoder was trained behind (BENCHMARKS.md section 2).
- ``pseudo-label``: the frozen source model's prediction averaged over a few
  invertible views (small rotations and zooms, gamma), thresholded, kept to its
  largest component per slice; the adapted network's final output is trained on
  the confident pixels (|p - 0.5| >= 0.4) with BCE + soft Dice, plus the
  agreement of its outputs on two photometric views of the same slices.
- ``stats+pseudo``: both losses summed.
- ``scanner-reference``: the target's per-channel feature mean and log-variance
  at every encoder batch-norm input, over all the adapted slices at once, should
  lie where the model's scanner reference (:mod:`napari_convlora.scanner_reference`,
  learnt over several training heads through the source profile) puts them,
  each channel weighted by how little it varies from head to head. The
  feature statistics above compare with the batch norms' running statistics,
  which mix every training head and augmentation and treat a channel that moves
  with anatomy (neck, field of view) like one that moves with the scanner; the
  reference is the distance `--standardize auto` and `--adapter auto` already
  trust, made the loss.
- ``shape-prior``: only the size prior of :mod:`napari_convlora.shape_prior` (the
  brain's area per slice, by lateral position, learnt from the source masks) on
  the adapted network's final output: it can only pull a leaking or collapsing
  mask back towards a plausible size, so it is measured alone and with the
  feature statistics, ``stats+prior``.

The early-head objective of the paper lives in :mod:`napari_convlora.adapt`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .adapters import encoder_batchnorms
from .model import UNet2D
from .scanner_reference import ScannerReference

INTENSITY_OBJECTIVE = "intensity"  # no adapter trained: the intensity map --standardize auto keeps
OBJECTIVES = (
    INTENSITY_OBJECTIVE, "early-head", "feature-stats", "pseudo-label", "stats+pseudo", "shape-prior", "stats+prior",
    "scanner-reference",
)  # fmt: skip
DEFAULT_OBJECTIVE = INTENSITY_OBJECTIVE
STATISTICS_OBJECTIVES = ("feature-stats", "stats+pseudo", "stats+prior")  # those with the feature-statistics loss
PSEUDO_LABEL_OBJECTIVES = ("pseudo-label", "stats+pseudo")  # those with the pseudo-label loss
PRIOR_OBJECTIVES = ("shape-prior", "stats+prior")  # those with the shape prior (the model must carry one)
REFERENCE_OBJECTIVES = ("scanner-reference",)  # those with the scanner-reference loss (the model must carry one)
CONFIDENCE = 0.4  # a pseudo-labelled pixel counts when |p - 0.5| >= this
CONSISTENCY_WEIGHT = 1.0
# Views of the pseudo-label: (rotation degrees, zoom, gamma). Invertible, and within the source training
# augmentation (rotations up to 20 degrees, zoom 0.8 to 1.25, gamma), so the source model is right on each.
PSEUDO_VIEWS = ((0.0, 1.0, 1.0), (8.0, 1.0, 1.0), (-8.0, 1.0, 1.0), (0.0, 1.08, 0.8), (0.0, 0.93, 1.25))


class SourceStatistics:
    """Per-channel mean and std at each encoder BN input of the source model, and the hooks that measure them."""

    def __init__(self, unet: UNet2D):
        self.layers = encoder_batchnorms(unet)
        self.mean = [bn.running_mean.detach().clone() for _, bn in self.layers]
        self.std = [torch.sqrt(bn.running_var.detach() + bn.eps) for _, bn in self.layers]
        self._seen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Record the batch's per-channel statistics at every encoder BN input while inside."""

        def hook(index: int):
            def record(_module, inputs):
                x = inputs[0]
                self._seen[index] = (x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))

            return record

        handles = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def loss(self) -> torch.Tensor:
        """Mean over layers and channels of |mu_t - mu_s| + |sd_t - sd_s|, in units of the source std.

        Dividing by the source std puts every layer on the same scale, so no layer
        with large activations dominates the sum.
        """
        if any(seen is None for seen in self._seen):
            raise RuntimeError("no statistics recorded: run the encoder inside measuring()")
        terms = []
        for (mean_t, std_t), mean_s, std_s in zip(self._seen, self.mean, self.std, strict=True):
            terms.append(((mean_t - mean_s).abs() + (std_t - std_s).abs()).div(std_s).mean())
        self._seen = [None] * len(self.layers)
        return torch.stack(terms).mean()


class ReferenceDistance:
    """:meth:`ScannerReference.distance` of the adapted encoder's features, differentiable.

    The moments are taken over every slice passed at once: the reference was
    learnt from 10 slices a head, and two slices' moments vary with anatomy more
    than the head-to-head spreads allow.
    """

    def __init__(self, unet: UNet2D, reference: ScannerReference, device: torch.device | str):
        self.layers = encoder_batchnorms(unet)
        if len(reference.layers) != len(self.layers):
            raise ValueError(f"a reference of {len(reference.layers)} layers for {len(self.layers)} encoder BNs")

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float32, device=device)

        self.reference = [
            (tensor(r.mean), tensor(r.mean_spread), tensor(r.log_var), tensor(r.log_var_spread))
            for r in reference.layers
        ]
        self.eps = [bn.eps for _, bn in self.layers]

    def loss(self, unet: UNet2D, images: torch.Tensor) -> torch.Tensor:
        """The spread-weighted squared distance of ``images``' feature moments from the reference."""
        terms: list[torch.Tensor] = []

        def hook(index: int):
            def record(_module, inputs):
                x = inputs[0]
                mean, spread_m, log_var, spread_v = self.reference[index]
                var = x.var(dim=(0, 2, 3)) + self.eps[index]
                parts = (x.mean(dim=(0, 2, 3)) - mean) ** 2 / spread_m + (var.log() - log_var) ** 2 / spread_v
                terms.append(parts.mean())

            return record

        handles = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(self.layers)]
        try:
            unet.encode(images)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(terms).mean()


def _affine(degrees: float, zoom: float, n: int, device: torch.device) -> torch.Tensor:
    theta = math.radians(degrees)
    matrix = torch.tensor(
        [[math.cos(theta) / zoom, -math.sin(theta) / zoom, 0.0], [math.sin(theta) / zoom, math.cos(theta) / zoom, 0.0]],
        dtype=torch.float32,
        device=device,
    )
    return matrix.expand(n, 2, 3)


def _inverse(theta: torch.Tensor) -> torch.Tensor:
    square = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]], device=theta.device).expand(len(theta), 1, 3)], 1)
    return torch.linalg.inv(square)[:, :2]


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gamma(images: torch.Tensor, gamma: float) -> torch.Tensor:
    return images.clamp(min=0).pow(gamma) if gamma != 1.0 else images


@torch.no_grad()
def multiview_probability(unet: UNet2D, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean over :data:`PSEUDO_VIEWS` of the model's probability, each view mapped back to the slice grid."""
    unet.eval()
    total = torch.zeros_like(images)
    for degrees, zoom, gamma in PSEUDO_VIEWS:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            theta = _affine(degrees, zoom, len(x), x.device)
            p = torch.sigmoid(unet(warp(_gamma(x, gamma), theta)))
            total[start : start + batch_size] += warp(p, _inverse(theta)) if (degrees, zoom) != (0.0, 1.0) else p
    return total / len(PSEUDO_VIEWS)


def pseudo_labels(probability: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (largest 2D component of p > 0.5 per slice) and weights (1 where |p - 0.5| >= CONFIDENCE).

    A confident foreground pixel outside the largest component is labelled
    background: isolated blobs are where a model leaks (neck, eyes), not brain.
    """
    p = probability[:, 0].cpu().numpy()
    labels = np.zeros_like(p, dtype=np.float32)
    for i, slice_p in enumerate(p):
        components, n = ndimage.label(slice_p > 0.5)
        if n:
            sizes = ndimage.sum_labels(np.ones_like(slice_p), components, index=np.arange(1, n + 1))
            labels[i] = components == 1 + int(np.argmax(sizes))
    weights = (np.abs(p - 0.5) >= CONFIDENCE).astype(np.float32)
    to = probability.device
    return torch.from_numpy(labels[:, None]).to(to), torch.from_numpy(weights[:, None]).to(to)


def photometric_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random gamma (0.8 to 1.25) and Gaussian noise (sd 0.02): same geometry, so outputs compare pixel by pixel."""
    gamma = float(torch.exp(torch.empty(1).uniform_(math.log(0.8), math.log(1.25), generator=generator)))
    noise = torch.randn(images.shape, generator=generator).to(images.device) * 0.02
    return _gamma(images, gamma) + noise


def pseudo_label_loss(
    unet: UNet2D, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """BCE + soft Dice on the confident pixels of ``x``, plus agreement between two photometric views."""
    logits = unet(x)
    bce = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum() / weights.sum().clamp(
        min=1.0
    )
    p = torch.sigmoid(logits) * weights
    target = labels * weights
    soft_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    a = torch.sigmoid(unet(photometric_view(x, generator)))
    b = torch.sigmoid(unet(photometric_view(x, generator)))
    return bce + soft_dice + CONSISTENCY_WEIGHT * F.mse_loss(a, b)
