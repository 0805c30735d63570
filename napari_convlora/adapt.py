"""Unsupervised adaptation to a new scanner: ConvLoRA + AdaBN self-training (Aleem et al., ISBI 2024).

On N unlabeled target slices: re-estimate the encoder's batch-norm statistics
(AdaBN); then for a few epochs train only the encoder adapters and encoder BN
affine parameters so that the Early Segmentation Head, reading the adapted
encoder, matches the soft prediction of the full network (frozen decoder). After
each epoch the BN statistics are re-estimated for the new weights and the
agreement (2D surface Dice at 1 mm) between the thresholded early-head and final
predictions is measured; the epoch that agrees best is kept. No label is used.

The adapters are ConvLoRA by default, or (``kind="moe"``) Conv-LoRA with a
mixture of scale experts, whose load-balancing loss is then added to the
self-training loss.

:func:`adapt` is a generator of typed reports so a GUI or a CLI can show
progress and stop it between steps. It works on a copy: the base model is never
modified, whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import (
    ADAPTER_KINDS,
    DEFAULT_EXPERTS,
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
from .geometry import SliceGeometry, plan
from .metrics import surface_dice
from .model import BaseModel, UNet2D
from .nifti import Volume

# Weight of the MoE load-balancing loss (summed over layers) against the self-training BCE: the
# value of Shazeer et al. and of the Conv-LoRA code. It only keeps experts in use; the gate learns from it alone.
BALANCE_WEIGHT = 1e-2


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

    def check(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise InputError(f"--kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        for name in ("slices", "epochs", "rank", "batch_size", "experts"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha must be a positive number, got {self.alpha}")


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
    best_epoch: int
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class AdaptDone:
    adapter: Adapter
    best_epoch: int
    agreements: list[float]
    slice_indices: list[int]
    seconds: float


@dataclass(frozen=True)
class AdaptCancelled:
    step: int
    seconds: float


Report = StepReport | EpochReport | AdaptDone | AdaptCancelled


def select_slices(stack: np.ndarray, n: int) -> list[int]:
    """``n`` slices spread evenly over the head, skipping slices with little or no head in them."""
    content = (stack > 0.1).mean(axis=(1, 2))
    candidates = np.flatnonzero(content >= 0.25 * content.max())
    if len(candidates) <= n:
        return [int(i) for i in candidates]
    positions = (np.arange(n) + 0.5) / n * len(candidates)
    return [int(candidates[int(p)]) for p in positions]


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
) -> Iterator[Report]:
    """Self-train an adapter on ``volume``; yield reports, ending with AdaptDone or AdaptCancelled.

    The adapter's metadata never names the input file: adapters are shared between
    sites, and scan file names often carry patient identifiers.
    """
    config.check()
    start = time.perf_counter()
    device = pick_device(config.device)
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    indices = slices_for(stack, config)
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

    if config.adabn:
        reestimate_bn(unet, images)
    steps_per_epoch = -(-len(indices) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    agreements: list[float] = []
    best_epoch, best_state = 0, None
    step = 0
    for epoch in range(1, config.epochs + 1):
        losses = []
        order = torch.randperm(len(indices), generator=generator)
        for first in range(0, len(indices), config.batch_size):
            if should_stop is not None and should_stop():
                yield AdaptCancelled(step, time.perf_counter() - start)
                return
            x = images[order[first : first + config.batch_size].to(device)]
            _train_mode(unet, head, config.adabn)
            features = unet.encode(x)
            with torch.no_grad():
                target = torch.sigmoid(unet.decode(tuple(f.detach() for f in features)))
            loss = F.binary_cross_entropy_with_logits(head(features[-1], x.shape[-2:]), target)
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
        if best_state is None or agreements[-1] > agreements[best_epoch - 1]:
            best_epoch = epoch
            best_state = extract_adapter(unet, {}).tensors
        elapsed = time.perf_counter() - start
        yield EpochReport(
            epoch,
            config.epochs,
            float(np.mean(losses)),
            agreements[-1],
            best_epoch,
            elapsed,
            elapsed / step * (total_steps - step),
        )
    seconds = time.perf_counter() - start
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
        seed=config.seed,
        best_epoch=best_epoch,
        agreements=agreements,
        seconds=round(seconds, 3),
        **({"balance_weight": BALANCE_WEIGHT} if config.kind == "moe" else {}),
    )
    adapter = Adapter(best_state, metadata)
    yield AdaptDone(adapter, best_epoch, agreements, indices, seconds)


def run_adaptation(
    base: BaseModel, volume: Volume, config: AdaptConfig = AdaptConfig(), name: str = "adapter"
) -> AdaptDone:
    """Run :func:`adapt` to the end (no progress display) and return its result."""
    done = None
    for report in adapt(base, volume, config, name):
        done = report
    assert isinstance(done, AdaptDone)
    return done
