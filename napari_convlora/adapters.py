"""Adapters with AdaBN statistics: the per-scanner part of the model.

Two kinds of adapter wrap the frozen encoder convs: ``convlora`` (:class:`ConvLoRA`,
a low-rank weight update, Aleem et al., ISBI 2024) and ``moe`` (:class:`ConvLoRAMoE`,
Conv-LoRA with a mixture of scale experts inside the low-rank bottleneck, Zhong
et al., ICLR 2024). Both start as exact no-ops. A third kind, ``intensity``,
changes no weight: it holds the monotone map the scanner's scaled intensities
go through before the frozen model reads them
(:class:`~napari_convlora.intensity_map.IntensityCurve`, in the metadata; the
file has no tensors). ``convlora adapt`` makes one by default
(:mod:`napari_convlora.adapt`): on the simulated scanners it recovered more of
the lost accuracy than any trained adapter (BENCHMARKS.md section 2).

A :class:`ConvLoRA` wraps a frozen ``nn.Conv2d`` with weight W (C_out x C_in x k x k)
and adds dW = (B @ A).view(W.shape) * alpha / r, with A of shape (r*k, C_in*k)
(random) and B of shape (C_out*k, r*k) (zero), so an adapter starts as an exact
no-op. Unlike the public reference code, merging keeps the original weight and
unmerging restores it bit for bit, so a model can never end up with W + 2 dW.

An :class:`Adapter` holds only what differs from the base model: the adapter
tensors of every encoder conv (A and B; for ``moe`` also the experts and the
gate), and the encoder's batch-norm affine parameters and running
statistics (AdaBN). Its file is safetensors with JSON metadata naming the base
model id; it is refused for any other base model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import InputError
from .files import atomic_write
from .intensity_map import IntensityCurve
from .model import METADATA_KEY, BaseModel, UNet2D, check_tensors, read_metadata

ADAPTER_FORMAT = "convlora-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_KINDS = ("convlora", "moe")  # the kinds that wrap the encoder convs (adapt --kind)
INTENSITY_KIND = "intensity"  # an intensity map, no weights
FILE_KINDS = (*ADAPTER_KINDS, INTENSITY_KIND)
CURVE_KEY = "intensity_curve"
DEFAULT_EXPERTS = 8
NOISE_EPSILON = 1e-2  # floor of the gate noise's standard deviation (Shazeer et al. 2017)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConvLoRA(nn.Module):
    """A frozen conv plus a trainable low-rank weight update."""

    TENSORS = ("lora_A", "lora_B")  # what an adapter file holds of this layer

    def __init__(self, conv: nn.Conv2d, rank: int = 2, alpha: float = 2.0, generator: torch.Generator | None = None):
        super().__init__()
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError("ConvLoRA needs an ungrouped conv with a square kernel")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        k = conv.kernel_size[0]
        self.conv = conv
        for p in conv.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank * k, conv.in_channels * k))
        self.lora_B = nn.Parameter(torch.zeros(conv.out_channels * k, rank * k))
        # Kaiming-uniform like nn.Linear (and loralib); B = 0 makes dW = 0 at start.
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self._unmerged_weight: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def merge(self) -> None:
        """Fold dW into the conv weight (fast inference); the original weight is kept."""
        if self.merged:
            return
        with torch.no_grad():
            self._unmerged_weight = self.conv.weight.detach().clone()
            self.conv.weight.add_(self.delta_weight())

    def unmerge(self) -> None:
        """Restore the exact original weight."""
        if not self.merged:
            return
        with torch.no_grad():
            self.conv.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.conv(x)
        # conv(x, W) + conv(x, dW) == conv(x, W + dW): one convolution instead of two.
        c = self.conv
        return F.conv2d(x, c.weight + self.delta_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)


class ConvLoRAMoE(nn.Module):
    """A frozen conv plus Conv-LoRA with a mixture of scale experts in its low-rank bottleneck.

    For the frozen conv W (C_out x C_in x k x k, stride s, padding p)::

        a = conv(x, A)                  A: r x C_in x k x k, W's stride and padding (Kaiming-uniform)
        y = conv(x, W) + alpha / r * conv1x1(a + E_g(a), B)      B: C_out x r x 1 x 1, zero

    so the adapter is an exact no-op until B moves (the added term is exactly 0,
    and x + 0 == x in floating point). Written in feature space rather than as a
    weight update because E is not linear.

    Expert i (scale i = 1..n) upsamples the r-channel map i times (nearest),
    applies a 3x3 conv r -> r with bias (bias zero-initialised) and a GELU, and
    average-pools i x i back to the original size: the same 3x3 conv then sees
    structures i times finer, which is the paper's multi-scale prior. The
    reference code resizes bicubically both ways; nearest up and area down
    instead make the expert computable exactly on the original grid (see
    :meth:`_expert`), which keeps the eighth expert as cheap as the first. As in
    the reference code, the expert output is added to the bottleneck (a + E_g(a)).

    The gate g is noisy top-1 gating (Shazeer et al. 2017): logits = mean-pooled
    a (r values per sample) times a zero-initialised n x r matrix; in training,
    Gaussian noise with standard deviation softplus(second zero-initialised
    matrix times the pooled a) + 0.01 is added, and each sample runs only its
    chosen expert (samples are grouped by expert: one batch per expert in use).
    With top-1 routing the renormalised gate value is exactly 1, so, as in the
    reference code (``multiply_by_gates=False``), the expert output is not
    scaled and the gate learns from the load-balancing loss alone. That loss, cv^2(importance) + cv^2(load), is left in
    :attr:`balance_loss` after each training forward pass; importance is the
    batch sum of the softmax gate probabilities (the sparse one-hot gates of
    top-1 routing would carry no gradient), load is Shazeer's smooth estimate
    of how many samples each expert gets. In eval mode there is no noise: the
    layer is deterministic, and no balance loss is computed.

    Unlike :class:`ConvLoRA` this layer cannot be merged into W: which expert
    runs depends on the input, and the GELU is not linear.
    """

    TENSORS = ("lora_A", "lora_B", "experts_weight", "experts_bias", "gate_weight", "noise_weight")

    def __init__(
        self,
        conv: nn.Conv2d,
        rank: int = 2,
        alpha: float = 2.0,
        experts: int = DEFAULT_EXPERTS,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError("ConvLoRAMoE needs an ungrouped conv with a square kernel")
        if rank < 1 or experts < 1:
            raise ValueError(f"rank and experts must be >= 1, got {rank} and {experts}")
        k = conv.kernel_size[0]
        self.conv = conv
        for p in conv.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling, self.experts = rank, alpha, alpha / rank, experts
        self.lora_A = nn.Parameter(torch.empty(rank, conv.in_channels, k, k))
        self.lora_B = nn.Parameter(torch.zeros(conv.out_channels, rank, 1, 1))
        # Expert i's conv is rows i*r..(i+1)*r: one 4-D tensor, so channels_last conversion works on it.
        self.experts_weight = nn.Parameter(torch.empty(experts * rank, rank, 3, 3))
        self.experts_bias = nn.Parameter(torch.zeros(experts * rank))
        self.gate_weight = nn.Parameter(torch.zeros(experts, rank))
        self.noise_weight = nn.Parameter(torch.zeros(experts, rank))
        # The generator draws the initial weights here and the gate noise in training, so a seed fixes both.
        self.generator = generator if generator is not None else torch.Generator()
        with torch.no_grad():  # Kaiming-uniform bounds, as nn.Conv2d's default init
            bound = 1.0 / math.sqrt(conv.in_channels * k * k)
            self.lora_A.uniform_(-bound, bound, generator=self.generator)
            bound = 1.0 / math.sqrt(rank * 9)
            self.experts_weight.uniform_(-bound, bound, generator=self.generator)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        a = F.conv2d(x, self.lora_A, None, c.stride, c.padding, c.dilation)
        mixed = a + self._run_experts(a, self._route(a))
        return c(x) + F.conv2d(mixed, self.lora_B) * self.scaling

    def _route(self, a: torch.Tensor) -> torch.Tensor:
        """The chosen expert of each sample; in training also sets :attr:`balance_loss`."""
        pooled = a.mean(dim=(2, 3))
        clean = pooled @ self.gate_weight.T
        if not self.training:
            self.balance_loss = None
            return clean.argmax(dim=1)  # first maximum on ties: deterministic
        noise_std = F.softplus(pooled @ self.noise_weight.T) + NOISE_EPSILON
        noise = torch.randn(clean.shape, generator=self.generator).to(clean.device, clean.dtype)
        noisy = clean + noise * noise_std
        importance = torch.softmax(noisy, dim=1).sum(dim=0)
        self.balance_loss = cv_squared(importance) + cv_squared(smooth_load(clean, noisy, noise_std))
        return noisy.argmax(dim=1)

    def _run_experts(self, a: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each sample through its chosen expert, one batch per expert, back in the input's order."""
        used = chosen.unique().tolist()
        if len(used) == 1:  # the whole batch agrees: no gather and scatter
            return self._expert(a, used[0])
        outputs, rows = [], []
        for i in used:
            picked = torch.nonzero(chosen == i)[:, 0]
            outputs.append(self._expert(a[picked], i))
            rows.append(picked)
        return torch.cat(outputs)[torch.argsort(torch.cat(rows))]

    def _expert(self, a: torch.Tensor, i: int) -> torch.Tensor:
        """Expert i: nearest upsampling by i + 1, 3x3 conv with bias, GELU, (i + 1) x (i + 1) average pooling.

        Computed on the original grid, without building the upsampled map (64
        times larger for the eighth expert, on a full-resolution 256 x 256
        bottleneck: seconds per step on a CPU). After nearest upsampling by s,
        the 3x3 conv at a fine pixel in row u (0..s-1) of its s x s block reads
        the original row above only if u = 0, the row below only if u = s - 1,
        and its own row otherwise; likewise for columns. So there are (at most)
        3 x 3 kinds of fine pixel, each a 3x3 conv on the original grid whose
        kernel sums the fine taps that land on the same original pixel, and the
        average pool is their GELU outputs weighted by how many fine pixels of
        each kind a block holds (1, s - 2, 1 per axis, over s^2). Zero padding
        of the fine grid is zero padding of the original grid. Equal, up to
        float rounding, to the literal computation (tests/test_adapters.py).
        """
        scale, r = i + 1, self.rank
        weight, bias = self.experts_weight[i * r : (i + 1) * r], self.experts_bias[i * r : (i + 1) * r]
        if scale == 1:
            return F.gelu(F.conv2d(a, weight, bias, padding=1))
        kinds = [k for k, n in enumerate((1, scale - 2, 1)) if n > 0]  # scale 2 has no middle row
        taps = _FINE_TO_COARSE_TAPS[kinds].to(a.device, a.dtype)  # (kinds, 3 original taps, 3 fine taps)
        kernels = torch.einsum("uyj,oqjk,vxk->uvoqyx", taps, weight, taps).reshape(-1, r, 3, 3)
        h = F.gelu(F.conv2d(a, kernels, bias.repeat(len(kinds) ** 2), padding=1))
        counts = torch.tensor([1.0, scale - 2.0, 1.0])[kinds]
        share = (counts[:, None] * counts[None, :]).reshape(1, -1) / scale**2
        # the weighted average of the kinds as a 1x1 conv: no reshaping copies of channels_last maps
        mix = torch.kron(share, torch.eye(r)).to(a.device, a.dtype)[:, :, None, None]
        return F.conv2d(h, mix)


# Which original-grid tap (rows) each fine tap (columns) of a 3x3 conv reads after nearest upsampling,
# for a fine pixel in the first, a middle, and the last row (or column) of its block (see ConvLoRAMoE._expert).
_FINE_TO_COARSE_TAPS = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ]
)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (population variance, so a single expert gives 0, not NaN)."""
    return x.var(correction=0) / (x.mean() ** 2 + 1e-10)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
    """Expected number of samples per expert under top-1 noisy gating (Shazeer et al. 2017, ``_prob_in_top_k``).

    P(expert i wins) with fresh noise on its logit alone: its clean logit plus
    noise must beat the best noisy logit of the others, the runner-up if i won,
    else the winner. Differentiable, unlike the count of samples each expert got.
    """
    if clean.shape[1] == 1:
        return torch.ones_like(clean).sum(dim=0)
    top = noisy.topk(2, dim=1).values
    threshold = torch.where(noisy > top[:, 1:2], top[:, 1:2], top[:, :1])
    return torch.special.ndtr((clean - threshold) / noise_std).sum(dim=0)


def inject_convlora(unet: UNet2D, rank: int = 2, alpha: float = 2.0, seed: int = 0) -> list[str]:
    """Wrap every conv of the encoder in a ConvLoRA (in place); return the wrapped layer names."""
    return inject_adapters(unet, "convlora", rank, alpha, seed=seed)


def inject_adapters(
    unet: UNet2D, kind: str, rank: int = 2, alpha: float = 2.0, experts: int = DEFAULT_EXPERTS, seed: int = 0
) -> list[str]:
    """Wrap every conv of the encoder in an adapter of ``kind`` (in place); return the wrapped layer names.

    Not the decoder: the ConvLoRA paper's ablation found no gain there. One
    generator, seeded, initialises every layer (and draws the MoE gate noise).
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}")
    if adapter_layers(unet):
        raise ValueError("this U-Net already has adapters")
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, module in unet.encoder_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            if kind == "moe":
                layer: nn.Module = ConvLoRAMoE(module, rank, alpha, experts, generator)
            else:
                layer = ConvLoRA(module, rank, alpha, generator)
            setattr(parent, child, layer)
            names.append(name)
    return names


def encoder_batchnorms(unet: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in unet.encoder_modules() if isinstance(m, nn.BatchNorm2d)]


def lora_layers(unet: nn.Module) -> list[tuple[str, ConvLoRA]]:
    """The ConvLoRA layers (the kind that can be merged)."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, ConvLoRA)]


def moe_layers(unet: nn.Module) -> list[tuple[str, ConvLoRAMoE]]:
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, ConvLoRAMoE)]


def adapter_layers(unet: nn.Module) -> list[tuple[str, ConvLoRA | ConvLoRAMoE]]:
    """Every adapter layer, of either kind."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, (ConvLoRA, ConvLoRAMoE))]


def balance_loss(unet: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' load-balancing losses; the layers must have just run a forward pass in training mode."""
    losses = [layer.balance_loss for _, layer in moe_layers(unet)]
    if not losses or any(loss is None for loss in losses):
        raise ValueError("no balance loss: the U-Net has no MoE layers, or they did not run in training mode")
    return torch.stack(losses).sum()


def set_trainable(unet: UNet2D) -> list[nn.Parameter]:
    """Freeze everything but adapter tensors and encoder BN affine parameters; return those."""
    for p in unet.parameters():
        p.requires_grad_(False)
    trainable = []
    for _, layer in adapter_layers(unet):
        trainable += [getattr(layer, t) for t in layer.TENSORS]
    for _, bn in encoder_batchnorms(unet):
        trainable += [bn.weight, bn.bias]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


# Last part of the file keys of trainable tensors: adapter tensors of either kind, and BN affine parameters.
TRAINABLE_TENSORS = frozenset((*ConvLoRA.TENSORS, *ConvLoRAMoE.TENSORS, "weight", "bias"))


@dataclass
class Adapter:
    """Adapter tensors + encoder BN state, and the metadata that says what they are for."""

    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def base_model_id(self) -> str:
        return str(self.metadata.get("base_model_id", ""))

    @property
    def standardizes(self) -> bool:
        """Adapted on standardised slices (:mod:`napari_convlora.standardize`): a scan is standardised for it too."""
        return bool(self.metadata.get("standardize", False))

    @property
    def curve(self) -> IntensityCurve | None:
        """The intensity map of an ``intensity`` adapter (None for the other kinds)."""
        if self.metadata.get("kind") != INTENSITY_KIND:
            return None
        return IntensityCurve.from_metadata(self.metadata.get(CURVE_KEY), str(self.path or self.name or "adapter"))

    @property
    def trainable_parameters(self) -> int:
        """The numbers an adapter learnt: its tensors', or an intensity map's heights above the first."""
        if self.curve is not None:
            return len(self.curve.heights) - 1
        return int(sum(t.numel() for k, t in self.tensors.items() if k.rpartition(".")[2] in TRAINABLE_TENSORS))


def adapter_tensors(unet: UNet2D) -> dict[str, torch.Tensor]:
    """The adapter part of an injected U-Net, by file key (the tensors themselves, not copies)."""
    tensors = {}
    for name, layer in adapter_layers(unet):
        for t in layer.TENSORS:
            tensors[f"{name}.{t}"] = getattr(layer, t)
    for name, bn in encoder_batchnorms(unet):
        for t in BN_TENSORS:
            tensors[f"{name}.{t}"] = getattr(bn, t)
    return tensors


def extract_adapter(unet: UNet2D, metadata: dict) -> Adapter:
    """Copy the adapter part of an adapted U-Net out of it."""
    tensors = {k: v.detach().cpu().clone() for k, v in adapter_tensors(unet).items()}
    meta = dict(metadata)
    meta.setdefault("layers", [n for n, _ in adapter_layers(unet)])
    return Adapter(tensors, meta)


def apply_adapter(base: BaseModel, adapter: Adapter | None, merge: bool = True) -> UNet2D:
    """A copy of the base U-Net with ``adapter`` loaded, in eval mode.

    ``merge`` folds ConvLoRA updates into the conv weights (one convolution per
    layer, as fast as the base model). MoE layers cannot be merged (the expert
    is chosen per input, and the experts are not linear), so a ``moe`` adapter
    always runs unmerged: only its BN statistics and affine parameters are part
    of the network as usual.
    """
    unet = base.copy().unet
    if adapter is None:
        return unet.eval()
    if adapter.base_model_id != base.model_id:
        raise InputError(
            f"{adapter.path or adapter.name}: adapter made for base model {adapter.base_model_id[:12]}, "
            f"not for this model {base.model_id[:12]}"
        )
    meta = adapter.metadata
    if meta.get("kind") == INTENSITY_KIND:  # no weights: the planner maps the scan through its curve
        return unet.eval()
    inject_adapters(unet, meta["kind"], int(meta["rank"]), float(meta["alpha"]), _experts(meta))
    load_adapter_state(unet, adapter)
    if merge:
        for _, layer in lora_layers(unet):
            layer.merge()
    return unet.eval()


def _experts(metadata: dict) -> int:
    """The number of experts of a ``moe`` adapter (unused by other kinds, whose files do not record it)."""
    return int(metadata.get("experts", DEFAULT_EXPERTS))


def load_adapter_state(unet: UNet2D, adapter: Adapter) -> None:
    """Copy adapter tensors into an injected U-Net, checking names and shapes first."""
    expected = adapter_tensors(unet)
    where = adapter.path or adapter.name or "adapter"
    check_tensors(where, adapter.tensors, expected, "adapter tensors do not fit the model")
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for key, t in adapter.tensors.items():
            module_name, _, attr = key.rpartition(".")
            getattr(modules[module_name], attr).copy_(t)


def new_metadata(
    base: BaseModel,
    name: str,
    rank: int | None = None,
    alpha: float | None = None,
    description: str = "",
    kind: str = "convlora",
    experts: int = DEFAULT_EXPERTS,
    **extra,
) -> dict:
    """What an adapter file says about itself; ``description`` is free text for the sites it is shared with.

    ``experts`` is recorded for ``moe`` adapters only: it decides their tensor shapes. ``rank`` and
    ``alpha`` are left out of an ``intensity`` adapter's, which has no low-rank update.
    """
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "kind": kind,
        **({"experts": experts} if kind == "moe" else {}),
        "name": name,
        "description": description,
        **({"rank": rank, "alpha": alpha} if kind != INTENSITY_KIND else {}),
        "base_model_id": base.model_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software_version": __version__,
        **extra,
    }


def save_adapter(adapter: Adapter, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter atomically (temporary file, then publish); never replaces a file unless asked."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in adapter.tensors.items()}
    text = json.dumps(adapter.metadata)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}), overwrite=overwrite)
    return path


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read and fully check an adapter file, which may come from another site.

    Refused, each with one message naming the file: anything that is not
    safetensors (a pickle is never unpickled), a truncated file, an unknown or
    newer format, bad metadata, missing or extra tensors, wrong shapes or
    dtypes for the U-Net it claims, and NaN/Inf values. Whether it fits a
    given base model is checked when it is applied (:func:`apply_adapter`).
    """
    path = Path(path)
    metadata = read_metadata(path, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION)
    _check_metadata(path, metadata)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: cannot read the adapter tensors ({exc})") from None
    _check_adapter_tensors(path, metadata, tensors)
    return Adapter(tensors, metadata, path)


def _check_metadata(path: Path, metadata: dict) -> None:
    kind, rank, alpha, base_id = (metadata.get(k) for k in ("kind", "rank", "alpha", "base_model_id"))
    if kind not in FILE_KINDS:
        raise InputError(f"{path}: adapter kind {kind!r} is not one this software reads ({', '.join(FILE_KINDS)})")
    if not isinstance(base_id, str) or len(base_id) != 64:
        raise InputError(f"{path}: adapter metadata has no valid base_model_id")
    for key in ("name", "description"):
        if not isinstance(metadata.get(key, ""), str):
            raise InputError(f"{path}: adapter metadata {key!r} must be text, got {metadata[key]!r}")
    if kind == INTENSITY_KIND:
        IntensityCurve.from_metadata(metadata.get(CURVE_KEY), str(path))
        return
    if not _positive_int(rank):
        raise InputError(f"{path}: adapter rank must be a positive integer, got {rank!r}")
    if kind == "moe" and not _positive_int(metadata.get("experts")):
        raise InputError(f"{path}: moe adapter 'experts' must be a positive integer, got {metadata.get('experts')!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"{path}: adapter alpha must be a positive number, got {alpha!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_adapter_tensors(path: Path, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes as the U-Net of the adapter's width, kind, rank (and experts) would have them."""
    kind = metadata["kind"]
    if kind == INTENSITY_KIND:
        if tensors:
            raise InputError(f"{path}: an intensity adapter holds no tensors, this one has {sorted(tensors)[:3]}")
        return
    expected = expected_adapter_tensors(_adapter_width(path, tensors), metadata["rank"], kind, _experts(metadata))
    check_tensors(path, tensors, expected, f"adapter tensors do not fit a U-Net with {kind} adapters")
    layers = sorted(k.removesuffix(".lora_A") for k in expected if k.endswith(".lora_A"))
    if "layers" in metadata and (not isinstance(metadata["layers"], list) or sorted(metadata["layers"]) != layers):
        raise InputError(f"{path}: adapter metadata 'layers' does not match its tensors")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: tensor {name} holds NaN or Inf values")


def _adapter_width(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """The U-Net base width an adapter was made for: the size of the first encoder batch norm."""
    probe = f"{encoder_batchnorms(UNet2D(1))[0][0]}.weight"
    t = tensors.get(probe)
    if t is None or t.ndim != 1 or t.numel() < 1:
        raise InputError(f"{path}: adapter tensors do not fit an adapted U-Net (no valid {probe})")
    return t.numel()


def expected_adapter_tensors(
    width: int, rank: int, kind: str = "convlora", experts: int = DEFAULT_EXPERTS
) -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors of an adapter for a ``width``-wide U-Net: no memory, whatever the width."""
    with torch.device("meta"):
        unet = UNet2D(width)
        inject_adapters(unet, kind, rank, experts=experts)
    return adapter_tensors(unet)
