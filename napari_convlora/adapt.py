"""Unsupervised adaptation to a new scanner: ConvLoRA + AdaBN self-training (Aleem et al., ISBI 2024), and more.

The default objective, ``intensity``, trains nothing: it keeps the intensity map
(plain, standardised, or a learnt curve) that ``--standardize auto``'s rule
chooses on the scan, as an ``intensity`` adapter (:func:`_adapt_intensity`;
:mod:`napari_convlora.objectives`). The others train adapters.

On N unlabeled target slices: re-estimate the encoder's batch-norm statistics
(AdaBN); then for a few epochs train only the encoder adapters and encoder BN
affine parameters on a label-free objective. The paper's (``early-head``): the
Early Segmentation Head, reading the adapted encoder, matches the soft
prediction of the full network (frozen decoder). The others
(:mod:`napari_convlora.objectives`): feature statistics matched to the source
model's, or multi-view pseudo-labels of the source model. After each epoch the
BN statistics are re-estimated for the new weights and the model is scored
without labels (:func:`napari_convlora.selection.consistency`, the masks'
stability under perturbations no objective trains on); the best epoch is kept,
and it is *accepted* only if it beats the source model on the do-no-harm gate's
score (by default the confidence of the whole-volume mask, which takes two
segmentations of the scan; :mod:`napari_convlora.selection`). The
early-head/final agreement of the paper is still measured and reported.

The adapters are ConvLoRA by default, or (``kind="moe"``) Conv-LoRA with a
mixture of scale experts, whose load-balancing loss is then added to the
self-training loss.

:func:`adapt` is a generator of typed reports so a GUI or a CLI can show
progress and stop it between steps. It works on a copy: the base model is never
modified, whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import (
    ADAPTER_KINDS,
    CURVE_KEY,
    DEFAULT_EXPERTS,
    INTENSITY_KIND,
    Adapter,
    balance_loss,
    encoder_batchnorms,
    extract_adapter,
    inject_adapters,
    moe_layers,
    new_metadata,
    set_trainable,
)
from .device import pick_device
from .errors import InputError
from .geometry import SliceGeometry, plan, select_slices
from .inference import Segmentation, SegmentProgress, input_reference
from .intensity_curve import CurveStep
from .intensity_map import IDENTITY, IntensityCurve, landmark_curve
from .metrics import surface_dice
from .model import BaseModel, UNet2D
from .nifti import Volume
from .objectives import (
    DEFAULT_OBJECTIVE,
    INTENSITY_OBJECTIVE,
    OBJECTIVES,
    PRIOR_OBJECTIVES,
    PSEUDO_LABEL_OBJECTIVES,
    REFERENCE_OBJECTIVES,
    STATISTICS_OBJECTIVES,
    ReferenceDistance,
    SourceStatistics,
    multiview_probability,
    pseudo_label_loss,
    pseudo_labels,
)
from .scanner_reference import required_reference
from .selection import (
    DEFAULT_GATE,
    DISTANCE_SLICES,
    GATE_MARGINS,
    GATES,
    IntensityChoice,
    accepted,
    confidence_margin,
    consistency,
    iter_plain_and_standardized,
    iter_source_and_adapted,
    mask_confidence,
)
from .shape_prior import ShapePrior, slice_positions
from .standardize import IntensityReference

# Weight of the MoE load-balancing loss (summed over layers) against the self-training BCE: the
# value of Shazeer et al. and of the Conv-LoRA code. It only keeps experts in use; the gate learns from it alone.
BALANCE_WEIGHT = 1e-2
SELECTIONS = ("consistency", "agreement")


@dataclass(frozen=True)
class AdaptConfig:
    slices: int = 10
    epochs: int = 5
    lr: float = 1e-4
    rank: int = 2
    alpha: float = 2.0
    batch_size: int = 2
    seed: int = 0
    slice_indices: Sequence[int] | None = None  # sagittal slices in the model's stack; None: spread automatically
    device: str = "auto"
    adabn: bool = True  # re-estimate encoder BN statistics on the target (False: ConvLoRA alone, the ablation)
    kind: str = "convlora"  # or "moe": Conv-LoRA with a mixture of scale experts
    experts: int = DEFAULT_EXPERTS  # scale experts per layer (kind "moe" only)
    objective: str = DEFAULT_OBJECTIVE  # see OBJECTIVES and napari_convlora.objectives
    selection: str = "consistency"  # epoch kept: best perturbation consistency, or "agreement" (the paper's)
    gate: str = DEFAULT_GATE  # the do-no-harm gate's score: see selection.GATES
    gate_margin: float | None = None  # accepted if the gate's score beats the source model's by this (None: per gate)
    standardize: bool = False  # adapt on standardised slices (napari_convlora.standardize); the adapter says so

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.selection not in SELECTIONS:
            raise InputError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.gate not in GATES:
            raise InputError(f"--gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.gate_margin is not None and not np.isfinite(self.gate_margin):
            raise InputError(f"the gate margin must be a number, got {self.gate_margin}")
        if self.kind not in ADAPTER_KINDS:
            raise InputError(f"--kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        if self.objective == INTENSITY_OBJECTIVE and self.kind != "convlora":
            raise InputError(f"--kind {self.kind} trains adapters; --objective intensity trains none")
        if self.objective == INTENSITY_OBJECTIVE and self.standardize:
            raise InputError("--objective intensity chooses the standardisation itself; leave out --standardize")
        for name in ("slices", "epochs", "rank", "batch_size", "experts"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha must be a positive number, got {self.alpha}")

    @property
    def margin(self) -> float:
        return GATE_MARGINS[self.gate] if self.gate_margin is None else self.gate_margin

    def margin_for(self, source_score: float) -> float:
        """The gate's margin on a scan: the caller's as given, else the gate's own (for confidence, the
        higher margin where the source model is already sure: :func:`selection.confidence_margin`)."""
        if self.gate == "confidence" and self.gate_margin is None:
            return confidence_margin(source_score, self.margin)
        return self.margin


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based, over the whole run
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float  # what is minimised: the self-training BCE (plus the weighted balance loss for kind "moe")
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    loss: float  # mean over the epoch's steps
    agreement: float  # early head vs final prediction, mean 2D surface Dice @ 1 mm
    score: float  # the label-free selection score (perturbation consistency) of this epoch's model
    best_epoch: int
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class GateProgress:
    """The gate segments the whole scan with the source and the adapted model: slices done of both."""

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class AdaptDone:
    adapter: Adapter
    best_epoch: int
    agreements: list[float]
    slice_indices: list[int]
    seconds: float
    scores: list[float]  # the selection score after each epoch
    source_score: float  # the source model's score on the same slices
    source_agreement: float  # the source model's early-head/final agreement on the same slices
    accepted: bool  # the do-no-harm gate: gate_score beats gate_source_score by the gate's margin
    gate: str  # which score the gate read (selection.GATES)
    gate_score: float  # the adapted model's
    gate_source_score: float  # the source model's, on the same scan
    # the confidence gate's whole-scan segmentation with the adapter (None with the consistency gate):
    # the result a caller would compute next, already paid for
    segmentation: Segmentation | None = None
    note: str = ""  # objective intensity: which input was kept and why (IntensityChoice.note)

    @property
    def score(self) -> float:
        return self.scores[self.best_epoch - 1]

    @property
    def gate_text(self) -> str:
        """The gate's evidence in words, for the user: which score, the adapter's and the source model's."""
        if self.note:
            return self.note
        return f"{self.gate} {self.gate_score:.4f} against the source model's {self.gate_source_score:.4f}"


@dataclass(frozen=True)
class AdaptCancelled:
    step: int
    seconds: float


Report = StepReport | EpochReport | GateProgress | CurveStep | AdaptDone | AdaptCancelled


def slices_for(stack: np.ndarray, config: AdaptConfig) -> list[int]:
    if config.slice_indices is None:
        return select_slices(stack, config.slices)
    indices = [int(i) for i in config.slice_indices]
    bad = [i for i in indices if not 0 <= i < len(stack)]
    if bad or not indices:
        raise InputError(f"slice indices {bad or indices} are outside 0..{len(stack) - 1}")
    return sorted(set(indices))


def reestimate_bn(unet: UNet2D, images: torch.Tensor) -> None:
    """AdaBN: set the encoder BN running statistics to the exact statistics of ``images``.

    One pass over all target slices at once (a handful, by design): averaging
    per-batch variances instead would miss the variance between batches. Every
    other module runs in eval mode, as at inference (MoE gates without noise),
    so the statistics are those of the network that will be used.
    """
    unet.eval()
    bns = [bn for _, bn in encoder_batchnorms(unet)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: with one batch, exactly that batch's statistics
        bn.train()
    with torch.no_grad():
        unet.encode(images)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


def agreement(
    unet: UNet2D, head: torch.nn.Module, images: torch.Tensor, geometry: SliceGeometry, batch_size: int
) -> float:
    """Mean 2D surface Dice @ 1 mm between thresholded early-head and final predictions (1.0 if both empty)."""
    unet.eval()
    head.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            features = unet.encode(x)
            final = (unet.decode(features) > 0)[:, 0].cpu().numpy()
            early = (head(features[-1], x.shape[-2:]) > 0)[:, 0].cpu().numpy()
            for f, e in zip(final, early, strict=True):
                score = surface_dice(f, e, geometry.plane_spacing, 1.0)
                scores.append(1.0 if np.isnan(score) else score)
    return float(np.mean(scores))


def _train_mode(unet: UNet2D, head: torch.nn.Module, adabn: bool) -> None:
    """Encoder BNs use batch statistics with AdaBN (source statistics without); decoder and head stay in eval mode.

    MoE layers train (noisy gates, balance loss); their frozen convs behave the same in either mode.
    """
    unet.eval()
    head.eval()
    if adabn:
        for _, bn in encoder_batchnorms(unet):
            bn.train()
    for _, layer in moe_layers(unet):
        layer.train()


def adapt(
    base: BaseModel,
    volume: Volume,
    config: AdaptConfig = AdaptConfig(),
    name: str = "adapter",
    should_stop: Callable[[], bool] | None = None,
    source: Segmentation | None = None,
) -> Iterator[Report]:
    """Self-train an adapter on ``volume``; yield reports, ending with AdaptDone or AdaptCancelled.

    ``source``: the source model's whole-scan segmentation of ``volume`` on this
    device, if the caller has it; the confidence gate then does not segment it again.
    The adapter's metadata never names the input file: adapters are shared between
    sites, and scan file names often carry patient identifiers.
    """
    config.check()
    start = time.perf_counter()
    if config.objective == INTENSITY_OBJECTIVE:
        yield from _adapt_intensity(base, volume, config, name, should_stop, source, start)
        return
    prior = None
    if config.objective in PRIOR_OBJECTIVES:  # before any work: a model without a prior cannot do these
        prior = ShapePrior.of_model(base)
    scanner = None
    if config.objective in REFERENCE_OBJECTIVES:
        scanner = required_reference(base, f"--objective {config.objective}")
    reference = input_reference(base, None, config.standardize)
    device = pick_device(config.device)
    geometry, scaled = plan(volume, base.intensity_scaling, reference)
    stack = geometry.to_model(scaled)
    indices = slices_for(stack, config)
    positions = slice_positions(indices, len(stack))
    images = torch.from_numpy(stack[indices][:, None].copy()).to(device)

    model = base.copy()  # never touch the caller's weights
    unet, head = model.unet, model.head.to(device)
    layers = inject_adapters(unet, config.kind, config.rank, config.alpha, config.experts, seed=config.seed)
    unet.to(device)
    trainable = set_trainable(unet)
    for p in head.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    views = torch.Generator().manual_seed(config.seed + 1)

    # Everything about the source model is measured before AdaBN changes its statistics.
    source_score = consistency(unet, images, config.batch_size)
    source_agreement = agreement(unet, head, images, geometry, config.batch_size)
    statistics = SourceStatistics(unet) if config.objective in STATISTICS_OBJECTIVES else None
    distance = ReferenceDistance(unet, scanner, device) if scanner is not None else None
    if config.objective in PSEUDO_LABEL_OBJECTIVES:
        labels, weights = pseudo_labels(multiview_probability(unet, images, config.batch_size))
    if config.adabn:
        reestimate_bn(unet, images)
    steps_per_epoch = -(-len(indices) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    agreements: list[float] = []
    scores: list[float] = []
    best_epoch, best_state = 0, None
    step = 0
    for epoch in range(1, config.epochs + 1):
        losses = []
        order = torch.randperm(len(indices), generator=generator)
        for first in range(0, len(indices), config.batch_size):
            if should_stop is not None and should_stop():
                yield AdaptCancelled(step, time.perf_counter() - start)
                return
            batch = order[first : first + config.batch_size].to(device)
            x = images[batch]
            _train_mode(unet, head, config.adabn)
            if config.objective == "early-head":
                features = unet.encode(x)
                with torch.no_grad():
                    target = torch.sigmoid(unet.decode(tuple(f.detach() for f in features)))
                loss = F.binary_cross_entropy_with_logits(head(features[-1], x.shape[-2:]), target)
            elif distance is not None:  # moments of every slice at once, as the reference was learnt
                loss = distance.loss(unet, images)
            else:
                loss = torch.zeros((), device=device)
                if statistics is not None:
                    with statistics.measuring():
                        out = unet(x) if prior is not None else unet.encode(x)
                    loss = loss + statistics.loss()
                elif prior is not None:
                    out = unet(x)
                if prior is not None:
                    loss = loss + prior.loss(out, positions[batch.cpu().numpy()])
                if config.objective in PSEUDO_LABEL_OBJECTIVES:
                    loss = loss + pseudo_label_loss(unet, x, labels[batch], weights[batch], views)
            if config.kind == "moe":
                loss = loss + BALANCE_WEIGHT * balance_loss(unet)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            elapsed = time.perf_counter() - start
            yield StepReport(
                step, total_steps, epoch, config.epochs, losses[-1], elapsed, elapsed / step * (total_steps - step)
            )
        if config.adabn:
            reestimate_bn(unet, images)
        agreements.append(agreement(unet, head, images, geometry, config.batch_size))
        scores.append(consistency(unet, images, config.batch_size))
        by = scores if config.selection == "consistency" else agreements
        if best_state is None or by[-1] > by[best_epoch - 1]:
            best_epoch = epoch
            best_state = extract_adapter(unet, {}).tensors
        elapsed = time.perf_counter() - start
        yield EpochReport(
            epoch,
            config.epochs,
            float(np.mean(losses)),
            agreements[-1],
            scores[-1],
            best_epoch,
            elapsed,
            elapsed / step * (total_steps - step),
        )
    metadata = new_metadata(
        base,
        name,
        config.rank,
        config.alpha,
        kind=config.kind,
        experts=config.experts,
        layers=layers,
        slices=indices,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        adabn=config.adabn,
        standardize=config.standardize,
        seed=config.seed,
        objective=config.objective,
        selection=config.selection,
        best_epoch=best_epoch,
        agreements=agreements,
        scores=[round(v, 5) for v in scores],
        source_score=round(source_score, 5),
        source_agreement=round(source_agreement, 5),
        **({"balance_weight": BALANCE_WEIGHT} if config.kind == "moe" else {}),
    )
    adapter = Adapter(best_state, metadata)
    segmentation = None
    if config.gate == "consistency":
        gate_score, gate_source_score = scores[best_epoch - 1], source_score
    else:
        gate_scores = yield from _volume_confidences(base, volume, adapter, config.device, start, should_stop, source)
        if gate_scores is None:
            yield AdaptCancelled(step, time.perf_counter() - start)
            return
        gate_source_score, gate_score, segmentation = gate_scores
    margin = config.margin_for(gate_source_score)
    is_accepted = accepted(gate_score, gate_source_score, margin)
    seconds = time.perf_counter() - start
    metadata.update(
        gate=config.gate,
        gate_score=round(gate_score, 5),
        gate_source_score=round(gate_source_score, 5),
        gate_margin=margin,
        accepted=is_accepted,
        seconds=round(seconds, 3),
    )
    yield AdaptDone(
        adapter, best_epoch, agreements, indices, seconds, scores, source_score, source_agreement, is_accepted,
        config.gate, gate_score, gate_source_score, segmentation,
    )  # fmt: skip


def _adapt_intensity(
    base: BaseModel,
    volume: Volume,
    config: AdaptConfig,
    name: str,
    should_stop: Callable[[], bool] | None,
    source: Segmentation | None,
    start: float,
) -> Iterator[Report]:
    """The ``intensity`` objective: ``--standardize auto``'s choice on ``volume``, kept as an intensity adapter.

    Reports: the curve's fit (:class:`CurveStep`), then the segmentations the rule
    compares (:class:`GateProgress`). The adapter holds the map the kept mask read
    (:class:`~napari_convlora.intensity_map.IntensityCurve`; the identity when the
    scan as it is was kept, and then the gate refuses it). The rule is the gate:
    the adapter is accepted when a mask other than the plain one was kept.
    """
    landmarks = IntensityReference.of_model(base)  # before any work: InputError naming the model file
    choosing = iter_plain_and_standardized(base, volume, None, config.device, should_stop, plain=source)
    while True:
        try:
            report = next(choosing)
        except StopIteration as finished:
            choice = finished.value
            break
        if isinstance(report, SegmentProgress):
            yield GateProgress(report.done, report.total, time.perf_counter() - start)
        else:
            yield report
    if choice is None:
        yield AdaptCancelled(0, time.perf_counter() - start)
        return
    geometry, scaled = plan(volume, base.intensity_scaling)
    indices = []  # the slices the curve was fitted on; the landmark maps read the whole head
    if choice.fit is not None:
        indices = select_slices(geometry.to_model(scaled), DISTANCE_SLICES)
    curve = _kept_map(choice, scaled, geometry, landmarks)
    del scaled
    plain_sure = mask_confidence(choice.plain.probability, choice.plain.mask)
    kept_sure = mask_confidence(choice.kept.probability, choice.kept.mask)
    seconds = time.perf_counter() - start
    fit = choice.fit
    metadata = new_metadata(
        base,
        name,
        kind=INTENSITY_KIND,
        objective=INTENSITY_OBJECTIVE,
        input=choice.kept_input,
        slices=indices,
        gate="confidence",
        gate_score=round(kept_sure, 5),
        gate_source_score=round(plain_sure, 5),
        accepted=choice.is_standardized,
        note=choice.note,
        seconds=round(seconds, 3),
        **({"curve_distances": [round(fit.distance_before, 5), round(fit.distance_after, 5)]} if fit else {}),
    )
    metadata[CURVE_KEY] = curve.as_metadata()
    yield AdaptDone(
        Adapter({}, metadata), 1, [], indices, seconds, [kept_sure], plain_sure, float("nan"), choice.is_standardized,
        "confidence", kept_sure, plain_sure, choice.kept, choice.note,
    )  # fmt: skip


def _kept_map(
    choice: IntensityChoice, scaled: np.ndarray, geometry: SliceGeometry, landmarks: IntensityReference
) -> IntensityCurve:
    """The map of scaled intensities (``scaled``: the scan as the planner scales it) that the kept mask read."""
    kept = choice.kept_input
    if kept == "plain":
        return IDENTITY
    if kept == "curve":
        assert choice.fit is not None  # a curve's mask comes with its fit
        return choice.fit.curve
    brain = geometry.to_ras(choice.standardized.mask) if kept == "brain" else None
    return landmark_curve(scaled, landmarks, brain)


def _volume_confidences(
    base: BaseModel,
    volume: Volume,
    adapter: Adapter,
    device: str,
    start: float,
    should_stop: Callable[[], bool] | None,
    source: Segmentation | None = None,
) -> Generator[GateProgress, None, tuple[float, float, Segmentation] | None]:
    """:func:`mask_confidence` of the whole-volume result of the source model and of the adapted one.

    Also the adapted model's segmentation itself, so that no caller segments twice.
    None if ``should_stop`` said so (between batches of slices).
    """
    pair = None
    checking = iter_source_and_adapted(base, volume, adapter, device, should_stop, source=source)
    while True:
        try:
            report = next(checking)
        except StopIteration as finished:
            pair = finished.value
            break
        yield GateProgress(report.done, report.total, time.perf_counter() - start)
    if pair is None:
        return None
    source, adapted = pair
    source_confidence = mask_confidence(source.probability, source.mask)
    return source_confidence, mask_confidence(adapted.probability, adapted.mask), adapted


def run_adaptation(
    base: BaseModel,
    volume: Volume,
    config: AdaptConfig = AdaptConfig(),
    name: str = "adapter",
    source: Segmentation | None = None,
) -> AdaptDone:
    """Run :func:`adapt` to the end (no progress display) and return its result (``source`` as for adapt)."""
    done = None
    for report in adapt(base, volume, config, name, source=source):
        done = report
    assert isinstance(done, AdaptDone)
    return done
