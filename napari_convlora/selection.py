"""Judging an adapted model without labels: perturbation consistency, mask confidence, and the do-no-harm gate.

A model that segments a scan well gives the same mask when the scan is a little
noisier, blurrier or more biased; one that has drifted (or a source model that
is lost on a new scanner) flips pixels near every decision boundary it is unsure
of. The score is the mean Dice between the mask of each target slice and the
masks of three perturbed copies of it (Gaussian noise, a smooth bias field, a
Gaussian blur). None of these perturbations is used by any training objective,
so training cannot learn the score itself.

This score picks the epoch to keep. The gate, which decides whether the kept
adapter is used at all, reads the whole scan (:data:`GATES`): by default the
*confidence* of the whole-volume mask (:func:`mask_confidence`: how far from 0.5
the probabilities are inside the mask), compared with the source model's on the
same scan; ``consistency`` is the former gate. An adapter is accepted only if its
score beats the source model's by the gate's margin; for confidence, a larger
margin where the source model is already sure (:func:`confidence_margin`). Why confidence: over 36
simulated scans of three real heads the models never saw
(``scripts/probe_plausibility.py``, BENCHMARKS.md section 2), the sign of its
change matched the sign of the true surface-Dice change on 34, consistency's on
18; consistency falls after almost every adaptation, helpful or not, and does
not see a mask that is stably wrong.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Generator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import Adapter
from .device import pick_device
from .errors import InputError
from .geometry import plan, select_slices
from .inference import Segmentation, SegmentProgress, input_reference, iter_segment
from .intensity_curve import CurveFit, CurveStep, iter_fit_curve
from .model import BaseModel, UNet2D
from .nifti import Volume
from .scanner_reference import ScannerReference, feature_moments, reference_from_metadata

GATE_MARGIN = 0.005  # consistency gate: fixed before the benchmark ran; BENCHMARKS.md section 2 reports what it gives
GATES = {
    "confidence": "mean confidence |2p - 1| of the whole-volume mask (two extra segmentations)",
    "consistency": "perturbation consistency on the adaptation slices",
}
DEFAULT_GATE = "confidence"
# confidence: margin chosen on the first 24 of the probe's 36 scans (ds000031, pycortex), then checked on Colin27
GATE_MARGINS = {"confidence": 0.0, "consistency": GATE_MARGIN}
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


def mask_confidence(probability: np.ndarray, mask: np.ndarray) -> float:
    """Mean |2p - 1| over the voxels in the final mask or above 0.5: how sure the model is of its brain.

    The union counts both what the clean-up removed (an unsure island lowers the
    score) and what it filled in. 0 for an empty result: a model that lost the
    brain must not look sure of itself.
    """
    region = (probability > 0.5) | (mask > 0)
    return float(np.abs(2.0 * probability[region] - 1.0).mean()) if region.any() else 0.0


def accepted(score: float, source_score: float, margin: float = GATE_MARGIN) -> bool:
    """The do-no-harm gate: keep an adapter only if it beats the source model's score by ``margin``."""
    return score > source_score + margin


# Where the source model is already sure of its mask, a small gain in confidence is no evidence: over the
# benchmark cells of seven base models and heads (BENCHMARKS.md section 2), every adapted or standardised mask
# that passed the plain confidence gate from a source confidence under 0.72 gained surface Dice, and every one
# that lost more than 0.01 started at 0.72 to 0.75 with a confidence gain under 0.015. Both numbers were
# chosen on those seven files, then checked on four bases none of them came from (the third training round).
SURE_SOURCE_CONFIDENCE = 0.72
SURE_SOURCE_MARGIN = 0.015


# --standardize auto with a model that carries no scanner reference keeps the brain-standardised mask only if it is
# this much more confident than the surer of the plain and head-standardised masks: the smallest lead that left no
# benchmark cell more than 0.01 below the source model on seven files (scripts/probe_standardize_rule.py,
# BENCHMARKS.md section 2). Two earlier rules that kept it when about as sure as the others lost 0.030 and 0.027 on a
# file they had not been fitted on.
BRAIN_STEP_LEAD = 0.003
# With a scanner reference, --standardize auto keeps the brain-standardised mask if its input's encoder features lie
# nearest the training heads' and nearer than the scan's as it is by this much (ScannerReference.distance), and its
# mask is no less confident than the plain one. Chosen on eleven benchmark files (BENCHMARKS.md section 2,
# scripts/probe_standardize_distance.py): 0.3 to 0.5 all kept every scan within 0.001 of the source model; 0.4, not
# the edge (on a weak base the brain step brought an in-domain scan 0.25 to 0.28 nearer and lost 0.027), fixed
# before six new files were read: every scan of them within 0.001 of the source model. Keeping the brain step by
# confidence too (BRAIN_STEP_LEAD) recovered more on four of them but lost 0.121 on the fifth.
DISTANCE_LEAD = 0.4
DISTANCE_SLICES = 10  # the slices whose encoder features are measured: as many as the scanner references were learnt on


def confidence_margin(source_confidence: float, margin: float = GATE_MARGINS["confidence"]) -> float:
    """The confidence gate's margin on a scan: ``margin``, raised to ``SURE_SOURCE_MARGIN`` where the source is sure."""
    return max(margin, SURE_SOURCE_MARGIN) if source_confidence >= SURE_SOURCE_CONFIDENCE else margin


def accepted_by_confidence(confidence: float, source_confidence: float) -> bool:
    """The confidence gate: :func:`accepted` with :func:`confidence_margin`'s margin for this source confidence."""
    return accepted(confidence, source_confidence, confidence_margin(source_confidence))


def iter_source_and_adapted(
    base: BaseModel,
    volume: Volume,
    adapter: Adapter,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    source: Segmentation | None = None,
    **segment_options,
) -> Generator[SegmentProgress, None, tuple[Segmentation, Segmentation] | None]:
    """The whole scan segmented by the source model, then with ``adapter``: what the confidence gate compares.

    ``source``: the source model's segmentation of this very scan (same model, device
    and options), if the caller has it; then only the adapter's run is made.
    Progress counts both runs (the first run's slice count stands in for the second's
    until it starts). None if ``should_stop`` said so.
    """
    runs = [{"adapter": adapter}] if source is not None else [{"adapter": None}, {"adapter": adapter}]
    results = yield from _iter_runs(base, volume, runs, device, should_stop, segment_options)
    if results is None:
        return None
    return (source, results[0]) if source is not None else (results[0], results[1])


class IntensityChoice(NamedTuple):
    """What :func:`iter_plain_and_standardized` kept, the scan's plain segmentation, and why."""

    kept: Segmentation
    plain: Segmentation
    standardized: Segmentation  # the head's landmarks standardised
    note: str  # one line for the user: which was kept, with the confidences
    brain: Segmentation | None = None  # the brain's landmarks too (None: the model has none)
    curve: Segmentation | None = None  # through the learnt curve (None: no reference, no brain landmarks, an adapter)
    fit: CurveFit | None = None  # that curve and its distances

    @property
    def is_standardized(self) -> bool:
        return self.kept is not self.plain

    @property
    def kept_input(self) -> str:
        """Which input the kept mask read: "plain", "head", "brain" (standardised so far) or "curve"."""
        for name, run in (("plain", self.plain), ("head", self.standardized), ("brain", self.brain)):
            if self.kept is run:
                return name
        return "curve"

    @property
    def seconds(self) -> float:
        """What the user waited for: every run made."""
        return sum(r.seconds for r in (self.plain, self.standardized, self.brain, self.curve) if r is not None)


def iter_plain_and_standardized(
    base: BaseModel,
    volume: Volume,
    adapter: Adapter | None = None,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    plain: Segmentation | None = None,
    **segment_options,
) -> Generator[SegmentProgress | CurveStep, None, IntensityChoice | None]:
    """The scan segmented as it is and standardised (:mod:`napari_convlora.standardize`); keep one of them.

    Standardised twice if the model has brain landmarks: the head's, then the
    head's and, under that run's mask, the brain's. With brain landmarks, a
    scanner reference and no adapter, a fourth run reads the scan through an
    intensity curve learnt towards the reference
    (:mod:`napari_convlora.intensity_curve`; its fit comes first, with its own
    progress: :class:`CurveStep` reports before the runs' :class:`SegmentProgress`).
    Which mask is kept:

    - the curve's, if its mask is no less confident than the plain one and the
      brain step's input lies no farther from the reference than the scan as
      it is. Where the brain step moves the scan away (the fat-suppressed look
      of the simulated Philips 1.5 T, whose brain landmarks sit where the
      training brains' do not), the curve lost up to 0.032 on one base with a
      surer mask; elsewhere it gained most (BENCHMARKS.md section 2,
      ``scripts/probe_curve_rule.py``: the rule fixed on two benchmark files,
      then checked on three more);
    - else the brain-standardised mask, if the model carries a scanner reference
      (:mod:`napari_convlora.scanner_reference`), no adapter is used, the brain
      step's input is the nearest of the three to the training heads' features
      and nearer than the scan as it is by :data:`DISTANCE_LEAD`
      (:func:`input_distances`), and its mask is no less confident than the
      plain one. The brain step gains most where the model's confidence barely
      moves (the simulated 3 T scanners), so confidence alone almost never chose
      it on sure models; how near the input comes to what the model was trained
      on does not ask the model to judge its own mask (BENCHMARKS.md section 2).
      Without a reference (or with an adapter): if its :func:`mask_confidence`
      beats the surer of the other two by :data:`BRAIN_STEP_LEAD`;
    - else the head-standardised mask if it passes the confidence gate
      (:func:`accepted_by_confidence`, the gate of adaptation applied to the
      input);
    - else the plain one.

    ``plain``: the scan's segmentation as it is (same model, adapter, device and
    options), if the caller has it; then it is not made again. None if stopped.
    """
    if adapter is not None and adapter.curve is not None:
        raise InputError(
            f"{adapter.path or adapter.name}: an intensity adapter maps the scan's intensities its own way; "
            "there is nothing for --standardize auto to choose"
        )
    brain_step = input_reference(base, adapter, True).brain is not None
    # read before any work: a broken reference is the user's error, named with the file
    reference = None
    if adapter is None:
        reference = reference_from_metadata(base.path or "the model", base.metadata, base.unet)
    fit = None
    if reference is not None and brain_step:
        fit = yield from _iter_curve(base, volume, reference, device, should_stop)
        if fit is None:
            return None
    runs: list[_Run] = [{"adapter": adapter, "standardize": False}] if plain is None else []
    runs.append({"adapter": adapter, "standardize": True})
    if brain_step:  # the brain is where the head-standardised run found it
        runs.append(lambda done: {"adapter": adapter, "standardize": True, "brain": done[-1].mask})
    if fit is not None:
        runs.append({"adapter": None, "standardize": False, "curve": fit.curve})
    results = yield from _iter_runs(base, volume, runs, device, should_stop, segment_options)
    if results is None:
        return None
    curve = results.pop() if fit is not None else None
    plain = plain if plain is not None else results[0]
    standardized, brain = (results[-2], results[-1]) if brain_step else (results[-1], None)
    masks = [("as it is", plain), ("head standardised", standardized)]
    if brain is not None:
        masks.append(("brain standardised", brain))
    sure = [mask_confidence(m.probability, m.mask) for _, m in masks]
    verdict = "mask confidence " + ", ".join(f"{c:.4f} {name}" for c, (name, _) in zip(sure, masks, strict=True))
    brain_kept, far = False, None
    if brain is not None and reference is not None:
        far = input_distances(base, volume, reference, standardized.mask, device)
        verdict += "; feature distance from the training heads " + ", ".join(
            f"{d:.2f} {name}" for d, (name, _) in zip(far, masks, strict=True)
        )
        brain_kept = far[2] <= min(far[1], far[0] - DISTANCE_LEAD) and sure[2] >= sure[0]
    elif brain is not None:
        brain_kept = sure[2] >= max(sure[:2]) + BRAIN_STEP_LEAD
    kept = 2 if brain_kept else 1 if accepted_by_confidence(sure[1], sure[0]) else 0
    note = "intensities kept as they are" if kept == 0 else f"intensities standardised, {('head', 'brain')[kept - 1]}"
    chosen = masks[kept][1]
    if curve is not None and fit is not None:
        curve_sure = mask_confidence(curve.probability, curve.mask)
        verdict += (
            f"; learnt intensity curve: mask confidence {curve_sure:.4f}, feature distance "
            f"{fit.distance_before:.2f} -> {fit.distance_after:.2f} on its slices"
        )
        if far is not None and curve_sure >= sure[0] and far[2] <= far[0]:
            chosen, note = curve, "intensities through the learnt curve"
    return IntensityChoice(chosen, plain, standardized, f"{note} ({verdict})", brain, curve, fit)


def _iter_curve(
    base: BaseModel,
    volume: Volume,
    reference: ScannerReference,
    device: str,
    should_stop: Callable[[], bool] | None,
) -> Generator[CurveStep, None, CurveFit | None]:
    """The intensity curve of ``volume`` for ``base`` (:func:`iter_fit_curve` on its plain slices), with progress."""
    torch_device = pick_device(device)
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    images = torch.from_numpy(stack[select_slices(stack, DISTANCE_SLICES)][:, None].copy()).to(torch_device)
    del scaled, stack
    unet = copy.deepcopy(base.unet).to(torch_device)
    return (yield from iter_fit_curve(unet, reference, images, should_stop=should_stop))


def input_distances(
    base: BaseModel, volume: Volume, reference: ScannerReference, brain: np.ndarray, device: str = "auto"
) -> list[float]:
    """How far the scan's encoder features lie from ``reference``: as it is, head-standardised, brain too.

    The distance (:meth:`ScannerReference.distance`) of the source model's
    encoder features on :data:`DISTANCE_SLICES` slices of the scan, the same
    slices for every input (picked on the plain stack). ``brain``: the
    head-standardised run's mask on the scan's grid, where the brain step
    reads the brain's landmarks.
    """
    torch_device = pick_device(device)
    unet = copy.deepcopy(base.unet).to(torch_device)
    landmarks = input_reference(base, None, True)
    distances, indices = [], None
    for intensity, mask in ((None, None), (landmarks, None), (landmarks, brain)):
        geometry, scaled = plan(volume, base.intensity_scaling, intensity, mask)
        stack = geometry.to_model(scaled)
        indices = select_slices(stack, DISTANCE_SLICES) if indices is None else indices
        images = torch.from_numpy(stack[indices][:, None].copy()).to(torch_device)
        distances.append(reference.distance(feature_moments(unet, images)))
    return distances


# One run of iter_segment: its keyword arguments, or a function of the runs made before it that gives them.
_Run = dict | Callable[[list[Segmentation]], dict]


def _iter_runs(
    base: BaseModel,
    volume: Volume,
    runs: list[_Run],
    device: str,
    should_stop: Callable[[], bool] | None,
    segment_options: dict,
) -> Generator[SegmentProgress, None, list[Segmentation] | None]:
    """Segment ``volume`` once per entry of ``runs``; progress counts them all."""
    results: list[Segmentation] = []
    done = total = 0
    for runs_left, run in zip(range(len(runs), 0, -1), runs, strict=True):
        result = None
        options = {**segment_options, **(run(results) if callable(run) else run)}
        for report in iter_segment(base, volume, device=device, should_stop=should_stop, **options):
            if isinstance(report, SegmentProgress):
                total = report.total
                yield SegmentProgress(done + report.done, done + runs_left * total, report.elapsed_s)
            result = report
        if result is None:
            return None
        done += total
        results.append(result)
    return results
