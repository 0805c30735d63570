"""ConvLoRA adapters with AdaBN statistics: the per-scanner part of the model.

A :class:`ConvLoRA` wraps a frozen ``nn.Conv2d`` with weight W (C_out x C_in x k x k)
and adds dW = (B @ A).view(W.shape) * alpha / r, with A of shape (r*k, C_in*k)
(random) and B of shape (C_out*k, r*k) (zero), so an adapter starts as an exact
no-op. Unlike the public reference code, merging keeps the original weight and
unmerging restores it bit for bit, so a model can never end up with W + 2 dW.

An :class:`Adapter` holds only what differs from the base model: A and B of
every encoder conv, and the encoder's batch-norm affine parameters and running
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
from .model import METADATA_KEY, BaseModel, UNet2D, check_tensors, read_metadata

ADAPTER_FORMAT = "convlora-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_KINDS = ("convlora",)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConvLoRA(nn.Module):
    """A frozen conv plus a trainable low-rank weight update."""

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


def inject_convlora(unet: UNet2D, rank: int = 2, alpha: float = 2.0, seed: int = 0) -> list[str]:
    """Wrap every conv of the encoder in a ConvLoRA (in place); return the wrapped layer names."""
    if lora_layers(unet):
        raise ValueError("this U-Net already has adapters")
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, module in unet.encoder_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            setattr(parent, child, ConvLoRA(module, rank, alpha, generator))
            names.append(name)
    return names


def encoder_batchnorms(unet: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in unet.encoder_modules() if isinstance(m, nn.BatchNorm2d)]


def lora_layers(unet: nn.Module) -> list[tuple[str, ConvLoRA]]:
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, ConvLoRA)]


def set_trainable(unet: UNet2D) -> list[nn.Parameter]:
    """Freeze everything but adapter matrices and encoder BN affine parameters; return those."""
    for p in unet.parameters():
        p.requires_grad_(False)
    trainable = []
    for _, layer in lora_layers(unet):
        trainable += [layer.lora_A, layer.lora_B]
    for _, bn in encoder_batchnorms(unet):
        trainable += [bn.weight, bn.bias]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


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
    def trainable_parameters(self) -> int:
        return int(
            sum(t.numel() for k, t in self.tensors.items() if k.endswith((".lora_A", ".lora_B", ".weight", ".bias")))
        )


def adapter_tensors(unet: UNet2D) -> dict[str, torch.Tensor]:
    """The adapter part of an injected U-Net, by file key (the tensors themselves, not copies)."""
    tensors = {}
    for name, layer in lora_layers(unet):
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
    for name, bn in encoder_batchnorms(unet):
        for t in BN_TENSORS:
            tensors[f"{name}.{t}"] = getattr(bn, t)
    return tensors


def extract_adapter(unet: UNet2D, metadata: dict) -> Adapter:
    """Copy the adapter part of an adapted U-Net out of it."""
    tensors = {k: v.detach().cpu().clone() for k, v in adapter_tensors(unet).items()}
    meta = dict(metadata)
    meta.setdefault("layers", [n for n, _ in lora_layers(unet)])
    return Adapter(tensors, meta)


def apply_adapter(base: BaseModel, adapter: Adapter | None, merge: bool = True) -> UNet2D:
    """A copy of the base U-Net with ``adapter`` loaded (merged for speed unless asked not to)."""
    unet = base.copy().unet
    if adapter is None:
        return unet.eval()
    if adapter.base_model_id != base.model_id:
        raise InputError(
            f"{adapter.path or adapter.name}: adapter made for base model {adapter.base_model_id[:12]}, "
            f"not for this model {base.model_id[:12]}"
        )
    meta = adapter.metadata
    inject_convlora(unet, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    load_adapter_state(unet, adapter)
    if merge:
        for _, layer in lora_layers(unet):
            layer.merge()
    return unet.eval()


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


def new_metadata(base: BaseModel, name: str, rank: int, alpha: float, description: str = "", **extra) -> dict:
    """What an adapter file says about itself; ``description`` is free text for the sites it is shared with."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "kind": "convlora",
        "name": name,
        "description": description,
        "rank": rank,
        "alpha": alpha,
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
    if kind not in ADAPTER_KINDS:
        raise InputError(f"{path}: adapter kind {kind!r} is not one this software reads ({', '.join(ADAPTER_KINDS)})")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"{path}: adapter rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha > 0):
        raise InputError(f"{path}: adapter alpha must be a positive number, got {alpha!r}")
    if not isinstance(base_id, str) or len(base_id) != 64:
        raise InputError(f"{path}: adapter metadata has no valid base_model_id")
    for key in ("name", "description"):
        if not isinstance(metadata.get(key, ""), str):
            raise InputError(f"{path}: adapter metadata {key!r} must be text, got {metadata[key]!r}")


def _check_adapter_tensors(path: Path, metadata: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes as the U-Net of the adapter's width would have them; finite values."""
    expected = expected_adapter_tensors(_adapter_width(path, tensors), metadata["rank"])
    check_tensors(path, tensors, expected, "adapter tensors do not fit a ConvLoRA U-Net")
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
        raise InputError(f"{path}: adapter tensors do not fit a ConvLoRA U-Net (no valid {probe})")
    return t.numel()


def expected_adapter_tensors(width: int, rank: int) -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors of an adapter for a ``width``-wide U-Net: no memory, whatever the width."""
    with torch.device("meta"):
        unet = UNet2D(width)
        inject_convlora(unet, rank=rank)
    return adapter_tensors(unet)
