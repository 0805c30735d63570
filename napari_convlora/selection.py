"""Judging an adapted model without labels: a perturbation-consistency score and the do-no-harm gate.

A model that segments a scan well gives the same mask when the scan is a little
noisier, blurrier or more biased; one that has drifted (or a source model that
is lost on a new scanner) flips pixels near every decision boundary it is unsure
of. The score is the mean Dice between the mask of each target slice and the
masks of three perturbed copies of it (Gaussian noise, a smooth bias field, a
Gaussian blur). None of these perturbations is used by any training objective,
so training cannot learn the score itself.

The same score picks the epoch to keep and drives the gate: an adapter is
accepted only if its score beats the source model's, on the same slices, by
:data:`GATE_MARGIN`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import UNet2D

GATE_MARGIN = 0.005  # fixed before the benchmark ran; BENCHMARKS.md section 2 reports what it gives
PERTURBATION_SEED = 1234  # fixed: every model is judged on the same perturbed copies
NOISE_SD = 0.05
BIAS_SD = 0.3
BLUR_SIGMA_PX = 1.2


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def perturbations(images: torch.Tensor) -> list[torch.Tensor]:
    """Noisy, biased and blurred copies of ``images`` (N x 1 x H x W), the same for a given input."""
    generator = torch.Generator().manual_seed(PERTURBATION_SEED)
    noise = torch.randn(images.shape, generator=generator).to(images.device) * NOISE_SD
    coarse = torch.randn((len(images), 1, 4, 4), generator=generator).to(images.device) * BIAS_SD
    bias = torch.exp(F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True))
    return [images + noise, images * bias, _blur(images, BLUR_SIGMA_PX)]


def _masks(unet: UNet2D, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([unet(images[i : i + batch_size]) > 0 for i in range(0, len(images), batch_size)])


def consistency(unet: UNet2D, images: torch.Tensor, batch_size: int = 4) -> float:
    """Mean Dice between each slice's mask and its perturbed copies' masks.

    A slice whose masks are empty scores 0, not 1: the slices are picked through
    the head, so an empty mask there is a model that lost the brain, and a
    collapsed adapter must not look perfectly stable.
    """
    unet.eval()
    clean = _masks(unet, images, batch_size).flatten(1).float()
    scores = []
    for perturbed in perturbations(images):
        other = _masks(unet, perturbed, batch_size).flatten(1).float()
        overlap = 2 * (clean * other).sum(1)
        total = clean.sum(1) + other.sum(1)
        scores.append(overlap / total.clamp(min=1))  # 0 where both are empty
    return float(torch.stack(scores).mean())


def accepted(score: float, source_score: float, margin: float = GATE_MARGIN) -> bool:
    """The do-no-harm gate: keep an adapter only if it beats the source model's score by ``margin``."""
    return score > source_score + margin
