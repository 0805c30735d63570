"""The multi-scanner benchmark: the paper's Table 1, plus the baselines it lacked, on simulated scanners.

A real head is put through every simulated profile (the source profile too, for
the in-domain reference) with several seeds; each method adapts the source model
on the same unlabeled target slices and segments the whole simulated volume,
which is scored (surface Dice @ tolerance, Dice, HD95) against the head's mask
carried onto the simulated grid. Methods:

- ``source``: the source model as it is;
- ``adabn``: encoder BN statistics re-estimated on the target slices, nothing trained;
- ``udas``: UDAS-style self-training of the first (init) block's own weights, no
  LoRA, source BN statistics (same early-head agreement loss as ours);
- ``convlora``: ConvLoRA early-head self-training with the source BN statistics (the ablation);
- ``paper``: ConvLoRA + AdaBN early-head self-training with the paper's epoch choice
  (early-head/final agreement);
- ``convlora+adabn``: the same with the epoch chosen by perturbation consistency;
- ``mixbn``: encoder BN statistics half source, half target; nothing trained;
- ``stats``, ``pseudo``, ``stats+pseudo``, ``prior``, ``stats+prior``: ConvLoRA
  trained on the objectives of :mod:`napari_convlora.objectives` (feature
  statistics, multi-view pseudo-labels, both; the size prior of
  :mod:`napari_convlora.shape_prior`, alone and with the statistics), source BN statistics;
- ``moe`` and ``moe+adabn``: the same self-training with Conv-LoRA adapters with a
  mixture of 8 scale experts (``kind="moe"``), without and with AdaBN;
- ``full-ft``: the whole U-Net fine-tuned on its own thresholded predictions
  (classic self-training on pseudo-labels);
- ``oracle``: the whole U-Net fine-tuned, after AdaBN, on the *true* labels of the
  same target slices: what labels would buy with the same slice budget;
- ``standardize``: the source model on the scan's intensities standardised to its
  training heads' (:mod:`napari_convlora.standardize`), nothing trained;
  ``standardize-brain``: the same, then the brain's landmarks too, under that
  first standardised mask (two segmentations, nothing trained);
  ``standardize+convlora+adabn``: ``convlora+adabn`` on standardised slices.

Every cell also records the label-free scores a user would have (the
perturbation consistency of the adapted model and of the source model on the
same slices, and the early-head agreement where there is an early head), so the
summary can say how well each score tracks accuracy and what the do-no-harm
gate would have given, without running anything twice.

Results are saved after every cell so that a run of hours that is stopped can
resume (:func:`run_benchmark` skips cells already in ``done``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from .adapt import AdaptConfig, _train_mode, agreement, reestimate_bn, run_adaptation, slices_for
from .adapters import apply_adapter, encoder_batchnorms
from .device import pick_device
from .errors import InputError
from .geometry import SliceGeometry, plan
from .inference import input_reference, predict_logits, segment
from .intensity_curve import KNOTS, fit_curve
from .intensity_map import IntensityCurve
from .metrics import evaluate
from .model import BaseModel, UNet2D
from .nifti import Volume
from .objectives import INTENSITY_OBJECTIVE, PRIOR_OBJECTIVES, REFERENCE_OBJECTIVES
from .scanner_reference import reference_from_metadata, required_reference
from .selection import (
    GATE_MARGIN,
    GATE_MARGINS,
    SURE_SOURCE_CONFIDENCE,
    SURE_SOURCE_MARGIN,
    accepted,
    accepted_by_confidence,
    consistency,
    mask_confidence,
)
from .shape_prior import ShapePrior
from .simulate import PROFILES, SOURCE_PROFILE, simulate
from .standardize import IntensityReference
from .training import segmentation_loss

METHODS: dict[str, str] = {
    "source": "source model, no adaptation",
    "adabn": "AdaBN only: encoder BN statistics re-estimated on the target slices",
    "udas": "UDAS-style: the first block's own weights self-trained, no LoRA, source BN statistics",
    "convlora": "ConvLoRA self-training, source BN statistics",
    "paper": "ConvLoRA + AdaBN early-head self-training, epoch by early-head agreement (the paper's method)",
    "convlora+adabn": "ConvLoRA + AdaBN early-head self-training, epoch by perturbation consistency",
    "mixbn": "encoder BN statistics half source, half target (re-estimated on the slices); nothing trained",
    "stats": "ConvLoRA trained to match the source feature statistics, source BN statistics",
    "pseudo": "ConvLoRA trained on multi-view pseudo-labels of the source model, source BN statistics",
    "stats+pseudo": "ConvLoRA trained on feature statistics and pseudo-labels together, source BN statistics",
    "prior": "ConvLoRA trained on the size prior alone (brain area per slice from the source masks), source BN",
    "stats+prior": "ConvLoRA trained on feature statistics and the size prior together, source BN statistics",
    "reference": "ConvLoRA trained towards the model's scanner reference (feature moments of its training heads)",
    "moe": "Conv-LoRA with a mixture of scale experts (MoE) self-training, source BN statistics",
    "moe+adabn": "Conv-LoRA with a mixture of scale experts (MoE) + AdaBN self-training",
    "full-ft": "full fine-tuning of the U-Net on its own thresholded predictions (pseudo-labels)",
    "oracle": "full fine-tuning of the U-Net on the true labels of the same slices (upper bound)",
    "standardize": "source model on the scan's intensities standardised to its training heads'; nothing trained",
    "standardize-brain": "as standardize, then the brain's landmarks too, under the standardised mask",
    "standardize+convlora+adabn": "ConvLoRA + AdaBN (as convlora+adabn) on standardised slices",
    "curve": "source model on the scan through a monotone intensity curve learnt towards its scanner reference",
    "intensity": "the default of adapt: the intensity map --standardize auto keeps (plain, standardised, curve), "
    "as an intensity adapter",
}
STANDARDIZED = "standardize+"  # a method name that starts so runs the adapter method after it on standardised slices
ORACLE_EPOCH_FACTOR = 4  # the oracle trains 4x the epochs (at 1e-3 instead of 1e-4 it wrecked the model: 0.24)
# A profile counts as a domain gap when the source model loses at least this much surface Dice on it (the
# issue's floor). Shares of smaller gaps are noise: a 0.005 gap, within one seed's sd, turned a 0.04 loss into -800%.
MIN_GAP = 0.10


@dataclass(frozen=True)
class Cell:
    """One (profile, seed, method) result."""

    profile: str
    seed: int
    method: str
    surface_dice: float
    dice: float
    hd95_mm: float
    trainable_parameters: int
    adapt_seconds: float
    score: float | None = None  # perturbation consistency of the adapted model on the target slices
    source_score: float | None = None  # the same for the source model
    agreement: float | None = None  # early-head/final agreement of the model used (kept epoch for adapters)
    source_agreement: float | None = None  # the same for the source model
    confidence: float | None = None  # selection.mask_confidence of this cell's whole-volume result (the gate's)
    source_confidence: float | None = None  # the same for the source model (None when its cell ran earlier)
    distance: float | None = None  # "curve": its input's distance from the model's scanner reference
    source_distance: float | None = None  # "curve": the scan's as it is, on the same slices


@dataclass(frozen=True)
class Adapted:
    model: BaseModel
    trainable_parameters: int
    seconds: float
    agreement: float | None = None
    standardize: bool = False  # the scan is standardised before this model reads it (napari_convlora.standardize)
    brain: bool = False  # its brain's landmarks too, where a first standardised segmentation found the brain
    curve: IntensityCurve | None = None  # the scan goes through this before the model reads it
    distances: tuple[float, float] | None = None  # the curve's fit: distance from the reference before, after


# Adapter methods: (kind, objective, AdaBN, epoch selection).
ADAPTER_METHODS: dict[str, tuple[str, str, bool, str]] = {
    "convlora": ("convlora", "early-head", False, "consistency"),
    "paper": ("convlora", "early-head", True, "agreement"),
    "convlora+adabn": ("convlora", "early-head", True, "consistency"),
    "moe": ("moe", "early-head", False, "consistency"),
    "moe+adabn": ("moe", "early-head", True, "consistency"),
    "stats": ("convlora", "feature-stats", False, "consistency"),
    "pseudo": ("convlora", "pseudo-label", False, "consistency"),
    "stats+pseudo": ("convlora", "stats+pseudo", False, "consistency"),
    "prior": ("convlora", "shape-prior", False, "consistency"),
    "stats+prior": ("convlora", "stats+prior", False, "consistency"),
    "reference": ("convlora", "scanner-reference", False, "consistency"),
}
MIX_SHARE = 0.5  # mixbn: share of the target statistics


def central_slab(volume: Volume, mask: Volume, width_mm: float) -> tuple[Volume, Volume]:
    """The central left-right slab of a head (``--quick``: fewer sagittal slices to segment)."""
    ornt = orientations.io_orientation(volume.affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 0)[0])  # the file axis that runs left-right
    n = volume.data.shape[axis]
    keep = max(1, min(n, round(width_mm / volume.spacing[axis])))
    first = (n - keep) // 2
    index = [slice(None)] * 3
    index[axis] = slice(first, first + keep)
    shift = np.eye(4)
    shift[axis, 3] = first
    affine = volume.affine @ shift
    return (
        replace(volume, data=volume.data[tuple(index)], affine=affine),
        replace(mask, data=mask.data[tuple(index)], affine=affine),
    )


def _with_unet(model: BaseModel, unet: UNet2D) -> BaseModel:
    """``model`` (a copy the caller owns) with ``unet`` in eval mode as its U-Net."""
    model.unet = unet.eval()
    return model


def _fit(
    unet: UNet2D,
    params: list[torch.nn.Parameter],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    set_mode: Callable[[], None],
) -> None:
    """A plain Adam loop over ``n`` slices; ``loss_of(unet, batch_indices)`` gives each step's loss."""
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, batch_size):
            set_mode()
            loss = loss_of(unet, order[first : first + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    unet.eval()


def adapt_with(base: BaseModel, volume: Volume, mask: Volume, method: str, config: AdaptConfig) -> Adapted:
    """The source model adapted to ``volume`` by ``method`` (``mask`` is read by the oracle only)."""
    start = time.perf_counter()
    if method == "source":
        return Adapted(base, 0, 0.0)
    if method in ("standardize", "standardize-brain"):
        IntensityReference.of_model(base)  # the landmarks are read when the scan is segmented
        return Adapted(base, 0, 0.0, standardize=True, brain=method == "standardize-brain")
    if method == "curve":
        _, _, images = target_slices(base, volume, config)
        device = pick_device(config.device)
        fit = fit_curve(base.copy().unet.to(device), required_reference(base, "the curve"), images.to(device))
        assert fit is not None  # nothing stops it
        seconds = time.perf_counter() - start
        return Adapted(base, KNOTS, seconds, curve=fit.curve, distances=(fit.distance_before, fit.distance_after))
    if method == "intensity":  # the adapter file's map, as a user applying it gets it
        done = run_adaptation(base, volume, replace(config, objective=INTENSITY_OBJECTIVE, standardize=False), method)
        meta = done.adapter.metadata
        distances = tuple(meta["curve_distances"]) if meta["input"] == "curve" else None
        return Adapted(base, done.adapter.trainable_parameters, done.seconds, curve=done.adapter.curve,
                       distances=distances)  # fmt: skip
    standardized = method.startswith(STANDARDIZED)
    if method.removeprefix(STANDARDIZED) in ADAPTER_METHODS:
        kind, objective, adabn, selection = ADAPTER_METHODS[method.removeprefix(STANDARDIZED)]
        # gates are applied after the fact from every cell's scores (gate_summary): no extra segmentations here
        settings = replace(
            config,
            kind=kind,
            objective=objective,
            adabn=adabn,
            selection=selection,
            gate="consistency",
            standardize=standardized,
        )
        done = run_adaptation(base, volume, settings, name=method)
        return Adapted(
            _with_unet(base.copy(), apply_adapter(base, done.adapter)),
            done.adapter.trainable_parameters,
            done.seconds,
            done.agreements[done.best_epoch - 1],
            standardize=standardized,
        )
    device = pick_device(config.device)
    geometry, indices, images = target_slices(base, volume, config)
    images = images.to(device)
    model = base.copy()
    unet, head = model.unet.to(device), model.head.to(device)
    torch.manual_seed(config.seed)
    if method in ("adabn", "mixbn"):
        source = [(bn.running_mean.clone(), bn.running_var.clone()) for _, bn in encoder_batchnorms(unet)]
        reestimate_bn(unet, images)
        if method == "mixbn":
            for (_, bn), (mean, var) in zip(encoder_batchnorms(unet), source, strict=True):
                bn.running_mean.lerp_(mean, 1 - MIX_SHARE)
                bn.running_var.lerp_(var, 1 - MIX_SHARE)
        return Adapted(_with_unet(model, unet.cpu()), 0, time.perf_counter() - start)
    if method == "udas":
        params = [p for name, p in unet.named_parameters() if name.startswith("init_path.")]

        def loss_of(net: UNet2D, batch: torch.Tensor) -> torch.Tensor:
            features = net.encode(images[batch])
            with torch.no_grad():
                target = torch.sigmoid(net.decode(tuple(f.detach() for f in features)))
            return F.binary_cross_entropy_with_logits(head(features[-1], images.shape[-2:]), target)

        _fit(unet, params, loss_of, len(indices), config.epochs, config.batch_size, config.lr, config.seed,
             lambda: _train_mode(unet, head, adabn=False))  # fmt: skip
    elif method in ("full-ft", "oracle"):
        if method == "full-ft":
            logits = np.concatenate([b for _, b in predict_logits(unet, images[:, 0].cpu().numpy(), device)])
            labels = torch.from_numpy((logits > 0)[:, None].astype(np.float32)).to(device)
            epochs, lr = config.epochs, config.lr
        else:
            truth = geometry.to_model(geometry.to_ras(mask.data).astype(np.float32)) > 0.5
            labels = torch.from_numpy(truth[indices][:, None].astype(np.float32)).to(device)
            reestimate_bn(unet, images)
            epochs, lr = ORACLE_EPOCH_FACTOR * config.epochs, config.lr
        unet = unet.to(memory_format=torch.contiguous_format)
        params = list(unet.parameters())

        def loss_of(net: UNet2D, batch: torch.Tensor) -> torch.Tensor:
            return segmentation_loss(net(images[batch]), labels[batch])

        _fit(unet, params, loss_of, len(indices), epochs, config.batch_size, lr, config.seed, unet.eval)
    else:
        raise ValueError(f"unknown method {method!r}")
    trainable = sum(p.numel() for p in params)
    return Adapted(_with_unet(model, unet.cpu()), trainable, time.perf_counter() - start)


def target_slices(
    base: BaseModel, volume: Volume, config: AdaptConfig
) -> tuple[SliceGeometry, list[int], torch.Tensor]:
    """The unlabeled slices every method adapts on (as :func:`napari_convlora.adapt.adapt` picks them), on the CPU.

    Standardised (:mod:`napari_convlora.standardize`) when ``config.standardize`` says so.
    """
    reference = input_reference(base, None, config.standardize)
    geometry, scaled = plan(volume, base.intensity_scaling, reference)
    stack = geometry.to_model(scaled)
    indices = slices_for(stack, config)
    return geometry, indices, torch.from_numpy(stack[indices][:, None].copy())


def early_agreement(model: BaseModel, base: BaseModel, geometry: SliceGeometry, images: torch.Tensor) -> float:
    """The paper's criterion for any model: its final mask against the (frozen) early head reading its encoder."""
    return agreement(model.unet.eval(), base.head.eval(), images, geometry, batch_size=4)


def run_benchmark(
    base: BaseModel,
    volume: Volume,
    mask: Volume,
    profiles: Iterable[str],
    seeds: Iterable[int],
    methods: Iterable[str],
    config: AdaptConfig = AdaptConfig(),
    tolerance_mm: float = 1.0,
    done: Iterable[Cell] = (),
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Cell]:
    """Yield one :class:`Cell` per (profile, seed, method) not already in ``done``."""
    if any(ADAPTER_METHODS.get(m.removeprefix(STANDARDIZED), ("", ""))[1] in PRIOR_OBJECTIVES for m in methods):
        ShapePrior.of_model(base)  # before any cell
    if any(m.startswith("standardize") for m in methods):
        IntensityReference.of_model(base, brain="standardize-brain" in methods)
    if any(needs_reference(m) for m in methods):
        required_reference(base, f"the method(s) {', '.join(m for m in methods if needs_reference(m))}")
    finished = {(c.profile, c.seed, c.method) for c in done}
    for seed in seeds:
        for profile in profiles:
            todo = [m for m in methods if (profile, seed, m) not in finished]
            todo.sort(key=lambda m: m != "source")  # the source model's confidence first: every cell's twin
            if not todo:
                continue
            scan, reference = simulate(volume, mask, profile, seed=seed)
            geometry, _, images = target_slices(base, scan, replace(config, seed=seed))
            source_score = consistency(base.unet, images, config.batch_size)
            source_agreement = early_agreement(base, base, geometry, images)
            source_confidence = None
            standardized_slices = None
            for method in todo:
                if should_stop is not None and should_stop():
                    return
                adapted = adapt_with(base, scan, reference, method, replace(config, seed=seed))
                seen = geometry, images  # the slices this model reads: standardised if it standardises
                if adapted.standardize:
                    if standardized_slices is None:
                        standardized_slices = target_slices(base, scan, replace(config, seed=seed, standardize=True))
                    seen = standardized_slices[0], standardized_slices[2]
                score = consistency(adapted.model.unet, seen[1], config.batch_size)
                agreed = adapted.agreement
                if agreed is None:
                    agreed = early_agreement(adapted.model, base, *seen)
                result = segment(
                    adapted.model, scan, device=config.device, standardize=adapted.standardize, curve=adapted.curve
                )
                if adapted.brain:  # the second run, as `segment --standardize auto` makes it
                    result = segment(adapted.model, scan, device=config.device, standardize=True, brain=result.mask)
                scores = evaluate(result.mask, reference.data, scan.spacing, tolerance_mm)
                confidence = round(mask_confidence(result.probability, result.mask), 5)
                if method == "source":
                    source_confidence = confidence
                yield Cell(
                    profile,
                    seed,
                    method,
                    round(scores["surface_dice"], 4),
                    round(scores["dice"], 4),
                    round(scores["hd95_mm"], 2),
                    adapted.trainable_parameters,
                    round(adapted.seconds, 2),
                    round(score, 5),
                    round(source_score, 5),
                    round(agreed, 5),
                    round(source_agreement, 5),
                    confidence,
                    source_confidence,
                    *(round(d, 4) for d in (adapted.distances or ())[::-1]),
                )


def summarise(cells: list[Cell]) -> dict:
    """Mean and sd per profile and method, the domain gap, and how much of it each method recovers.

    The gap of a target profile is in-domain surface Dice (the source model on the
    source profile, same seed) minus the source model's on the target; recovery is
    (method - source) / gap, averaged over the target profiles whose gap is at least ``MIN_GAP``.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    by_key = {(c.profile, c.seed, c.method): c for c in cells}
    profiles = list(dict.fromkeys(c.profile for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    for profile in profiles:
        table[profile] = {}
        for method in methods:
            rows = [c for c in cells if c.profile == profile and c.method == method]
            if rows:
                values = np.array([c.surface_dice for c in rows])
                table[profile][method] = {
                    "mean": float(values.mean()),
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "n": len(values),
                    "trainable_parameters": rows[0].trainable_parameters,
                    "adapt_seconds": float(np.mean([c.adapt_seconds for c in rows])),
                }
    gaps, recovery = {}, {m: [] for m in methods}
    for profile in profiles:
        if profile == SOURCE_PROFILE:
            continue
        per_seed = []
        for seed in {c.seed for c in cells}:
            ref, src = by_key.get((SOURCE_PROFILE, seed, "source")), by_key.get((profile, seed, "source"))
            if ref is not None and src is not None:
                per_seed.append(ref.surface_dice - src.surface_dice)
        if not per_seed:
            continue
        gaps[profile] = float(np.mean(per_seed))
        if gaps[profile] >= MIN_GAP and not PROFILES[profile].stress:
            for method, stats in table[profile].items():
                recovery[method].append((stats["mean"] - table[profile]["source"]["mean"]) / gaps[profile])
    return {
        "table": table,
        "gap": gaps,
        "recovery": {m: float(np.mean(v)) for m, v in recovery.items() if v},
        "min_gap": MIN_GAP,
        "gate": gate_summary(cells, gaps),
        "criteria": criteria_summary(cells),
    }


# cell field -> its source twin; "score" is the perturbation consistency
GATE_CRITERIA = {"score": "source_score", "agreement": "source_agreement", "confidence": "source_confidence"}
GATE_CRITERION_MARGINS = {
    "score": GATE_MARGINS["consistency"],
    "agreement": GATE_MARGIN,
    "confidence": GATE_MARGINS["confidence"],
}


def _passes(cell: Cell, criterion: str) -> bool:
    if criterion == "confidence":
        return accepted_by_confidence(cell.confidence, cell.source_confidence)
    return accepted(
        getattr(cell, criterion), getattr(cell, GATE_CRITERIA[criterion]), GATE_CRITERION_MARGINS[criterion]
    )


def _gated(cell: Cell, source: Cell, criterion: str) -> float:
    """What a user gets with the gate: the adapted mask if its score passed, else the source model's."""
    return cell.surface_dice if _passes(cell, criterion) else source.surface_dice


def gate_summary(cells: list[Cell], gaps: dict[str, float]) -> dict:
    """Per gate criterion and method: cells accepted, worst loss against the source model with and without
    the gate, mean gain, gated recovery. Stress profiles are left out, as from every headline figure."""
    return {criterion: _gate_summary(cells, gaps, criterion) for criterion in GATE_CRITERIA}


def _gate_summary(cells: list[Cell], gaps: dict[str, float], criterion: str) -> dict:
    sources = {(c.profile, c.seed): c for c in cells if c.method == "source"}
    out = {}
    for method in dict.fromkeys(c.method for c in cells):
        rows = [
            (c, sources[c.profile, c.seed])
            for c in cells
            if c.method == method and getattr(c, criterion) is not None
            and getattr(c, GATE_CRITERIA[criterion]) is not None
            and (c.profile, c.seed) in sources and not PROFILES[c.profile].stress
        ]  # fmt: skip
        if method == "source" or not rows:
            continue
        plain = [c.surface_dice - s.surface_dice for c, s in rows]
        gated = [_gated(c, s, criterion) - s.surface_dice for c, s in rows]
        shares = []
        for profile, gap in gaps.items():
            if gap >= MIN_GAP and not PROFILES[profile].stress:
                mine = [g for (c, _), g in zip(rows, gated, strict=True) if c.profile == profile]
                if mine:
                    shares.append(float(np.mean(mine)) / gap)
        out[method] = {
            "cells": len(rows),
            "accepted": sum(_passes(c, criterion) for c, _ in rows),
            "worst_without_gate": float(min(plain)),
            "worst_with_gate": float(min(gated)),
            "mean_gain_without_gate": float(np.mean(plain)),
            "mean_gain_with_gate": float(np.mean(gated)),
            "recovery_with_gate": float(np.mean(shares)) if shares else None,
            "margin": GATE_CRITERION_MARGINS[criterion],
        }
    return out


def criteria_summary(cells: list[Cell]) -> dict:
    """How well each label-free score tracks the true surface Dice (Spearman rank correlations).

    ``pooled``: over every cell; ``within_scan``: over the methods on one simulated
    scan, averaged over scans (what choosing between adapters needs); ``gain``: the
    score's change against the source model against the surface Dice's change.
    """
    from scipy.stats import spearmanr

    sources = {(c.profile, c.seed): c for c in cells if c.method == "source"}
    out = {}
    for criterion in GATE_CRITERIA:
        rows = [c for c in cells if getattr(c, criterion) is not None and not PROFILES[c.profile].stress]
        if len(rows) < 3:
            continue
        pooled = spearmanr([getattr(c, criterion) for c in rows], [c.surface_dice for c in rows]).statistic
        within = []
        for key in {(c.profile, c.seed) for c in rows}:
            scan = [c for c in rows if (c.profile, c.seed) == key]
            values = [getattr(c, criterion) for c in scan]
            if len(scan) >= 3 and len(set(values)) > 1:
                within.append(spearmanr(values, [c.surface_dice for c in scan]).statistic)
        entry = {"pooled": float(pooled), "within_scan": float(np.mean(within)) if within else None, "cells": len(rows)}
        twin = GATE_CRITERIA[criterion]
        paired = [
            c for c in rows if c.method != "source" and getattr(c, twin) is not None and (c.profile, c.seed) in sources
        ]
        if len(paired) >= 3:
            gain = spearmanr(
                [getattr(c, criterion) - getattr(c, twin) for c in paired],
                [c.surface_dice - sources[c.profile, c.seed].surface_dice for c in paired],
            ).statistic
            entry["gain"] = float(gain)
        out[criterion] = entry
    return out


def markdown(summary: dict) -> str:
    """The summary as a Markdown table: rows are profiles, columns methods (surface Dice mean +- sd)."""
    table = summary["table"]
    methods = list(dict.fromkeys(m for row in table.values() for m in row))
    lines = [
        "| profile | gap | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for profile, row in table.items():
        gap = summary["gap"].get(profile)
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['sd']:.3f}" if m in row else "" for m in methods]
        lines.append(f"| {profile} | {'' if gap is None else f'{gap:.3f}'} | " + " | ".join(cells) + " |")
    recovery = summary["recovery"]
    lines.append(f"| recovered share of the gap (gap >= {summary['min_gap']:.2f}) | | " + " | ".join(
        f"{recovery[m]:.0%}" if m in recovery else "" for m in methods) + " |")  # fmt: skip
    any_row = next(iter(table.values()))
    lines.append("| trainable parameters | | " + " | ".join(
        f"{any_row[m]['trainable_parameters']:,}" if m in any_row else "" for m in methods) + " |")  # fmt: skip
    seconds = {m: np.mean([row[m]["adapt_seconds"] for row in table.values() if m in row]) for m in methods}
    lines.append("| adaptation seconds (mean) | | " + " | ".join(f"{seconds[m]:.1f}" for m in methods) + " |")
    gates = summary.get("gate", {})
    if any(gates.values()):
        lines += [
            "",
            "Do-no-harm gate (accept if the label-free score beats the source model's by the margin: "
            + ", ".join(f"{k} {v}" for k, v in GATE_CRITERION_MARGINS.items())
            + f", raised to {SURE_SOURCE_MARGIN} from a source confidence of {SURE_SOURCE_CONFIDENCE}"
            + "; stress profiles out):",
            "",
            "| gate score | method | accepted | worst vs source, no gate | with gate | mean gain, no gate | with gate "
            "| recovered share with gate |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for criterion, gate in gates.items():
        for method, g in gate.items():
            share = "" if g["recovery_with_gate"] is None else f"{g['recovery_with_gate']:.0%}"
            lines.append(
                f"| {criterion} | {method} | {g['accepted']}/{g['cells']} | {g['worst_without_gate']:+.3f} | "
                f"{g['worst_with_gate']:+.3f} | {g['mean_gain_without_gate']:+.3f} | {g['mean_gain_with_gate']:+.3f} "
                f"| {share} |"
            )
    criteria = summary.get("criteria", {})
    if criteria:
        lines += ["", "| label-free score | Spearman, all cells | within a scan (mean) | gain vs gain | cells |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, c in criteria.items():
            within = "" if c["within_scan"] is None else f"{c['within_scan']:.2f}"
            gain = f"{c['gain']:.2f}" if "gain" in c else ""
            lines.append(f"| {name} | {c['pooled']:.2f} | {within} | {gain} | {c['cells']} |")
    return "\n".join(lines) + "\n"


def cells_from_json(rows: list[dict]) -> list[Cell]:
    return [Cell(**row) for row in rows]


def cells_to_json(cells: list[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]


def default_profiles() -> list[str]:
    """The source profile first (in-domain reference), then every simulated target."""
    return [SOURCE_PROFILE, *(p for p in PROFILES if p != SOURCE_PROFILE)]


def needs_reference(method: str) -> bool:
    """Whether ``method`` reads the model's scanner reference (the curve, the ``scanner-reference`` objective)."""
    adapter = ADAPTER_METHODS.get(method.removeprefix(STANDARDIZED))
    return method == "curve" or (adapter is not None and adapter[1] in REFERENCE_OBJECTIVES)


def default_methods(base: BaseModel) -> list[str]:
    """Every method, less those that need a scanner reference when ``base`` carries none."""
    has_reference = reference_from_metadata(base.path or "the model", base.metadata, base.unet) is not None
    return [m for m in METHODS if has_reference or not needs_reference(m)]


def check_methods(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return methods
