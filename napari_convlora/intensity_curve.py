"""A monotone intensity curve, learnt without labels on a handful of slices, that brings a scan to the model.

Simulated scanners cost the source model most through contrast: where CSF,
grey and white matter, fat and marrow sit on the intensity scale. Landmark
standardisation (:mod:`napari_convlora.standardize`) pins percentiles of the
head or the brain and needs a rule to say which step to trust; ConvLoRA cannot
express such a remap at all (its first conv is linear in the intensities), and
its label-free objectives recover at most about a quarter of the gap
(BENCHMARKS.md section 2).

Here the remap is learnt. A curve on [0, 1] with :data:`KNOTS` equal pieces,
monotone by construction (cumulative softplus increments, starting at the
identity, f(0) = 0, capped at 1 as the scaling caps the scan), maps the scaled scan before the frozen source model reads
it. Its :data:`KNOTS` parameters are trained with Adam so that the encoder's
feature moments on the adaptation slices come as near as they can to the
model's scanner reference (:mod:`napari_convlora.scanner_reference`: the
training heads through the source profile; the loss is
:class:`napari_convlora.objectives.ReferenceDistance`); the curve of the step
with the smallest distance is kept. Monotone means the tissue order of a T1
is kept whatever the loss asks, so it can change contrast but never invert it.
No weight of the network changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .intensity_map import IntensityCurve
from .model import UNet2D
from .objectives import ReferenceDistance
from .scanner_reference import ScannerReference

KNOTS = 12  # equal pieces of [0, 1]; the curve's parameters
STEPS = 60  # Adam steps on all the adaptation slices at once
LR = 0.05


def _heights(theta: torch.Tensor) -> torch.Tensor:
    """Knot heights from the parameters: from 0, non-decreasing, capped at 1 (the model was trained on [0, 1])."""
    return torch.cat([theta.new_zeros(1), torch.cumsum(F.softplus(theta), 0)]).clamp(max=1.0)


def _through(images: torch.Tensor, heights: torch.Tensor) -> torch.Tensor:
    knots = len(heights) - 1
    position = images.clamp(0, 1) * knots
    lower = position.floor().clamp(max=knots - 1).long()
    fraction = position - lower
    return heights[lower] * (1 - fraction) + heights[lower + 1] * fraction


@dataclass(frozen=True)
class CurveFit:
    curve: IntensityCurve
    distance_before: float  # the scan's distance from the reference as it is
    distance_after: float  # through the kept curve
    best_step: int  # 0: the identity was never beaten


@dataclass(frozen=True)
class CurveStep:
    """One step of the fit done, of ``steps``, and the distance it measured (for a progress display)."""

    step: int
    steps: int
    distance: float
    elapsed_s: float  # since the fit began


def iter_fit_curve(
    unet: UNet2D,
    reference: ScannerReference,
    images: torch.Tensor,
    steps: int = STEPS,
    lr: float = LR,
    knots: int = KNOTS,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[CurveStep, None, CurveFit | None]:
    """Learn the curve on ``images`` (N x 1 x H x W, scaled) through the frozen ``unet``; yield each step.

    Returns the fit, or None if ``should_stop`` said so (checked before every step).
    The network's weights are never changed; their ``requires_grad`` flags are restored.
    """
    start = time.perf_counter()
    unet = unet.eval()
    frozen = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        distance = ReferenceDistance(unet, reference, images.device)
        theta = torch.full((knots,), float(np.log(np.expm1(1.0 / knots))), device=images.device, requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=lr)
        best_step, best_theta, before = 0, theta.detach().clone(), None
        best = float("inf")
        for step in range(steps + 1):
            if should_stop is not None and should_stop():
                return None
            loss = distance.loss(unet, _through(images, _heights(theta)))
            value = loss.item()
            if before is None:
                before = value
            if value < best:
                best, best_step, best_theta = value, step, theta.detach().clone()
            if step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield CurveStep(step + 1, steps, value, time.perf_counter() - start)
    finally:
        for p, was in frozen:
            p.requires_grad_(was)
    heights = tuple(float(h) for h in _heights(best_theta).cpu().double())
    return CurveFit(IntensityCurve(heights), before, best, best_step)


def fit_curve(unet: UNet2D, reference: ScannerReference, images: torch.Tensor, **options) -> CurveFit | None:
    """Run :func:`iter_fit_curve` to the end (same arguments) and return its result."""
    fitting = iter_fit_curve(unet, reference, images, **options)
    while True:
        try:
            next(fitting)
        except StopIteration as finished:
            return finished.value
