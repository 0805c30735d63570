"""The 2D U-Net of the ConvLoRA paper, its Early Segmentation Head, and their weight files.

Architecture (UNet2D of the CC359 domain-adaptation line of work): widths
w, 2w, 4w, 8w; stride-2 2x2 convs instead of pooling; pre-activation residual
blocks (BN-ReLU-Conv3x3 twice plus identity), three per stage; additive skips
through 1x1 convs; one output logit. With w = 16 it has 2,451,091 parameters.

The encoder (``init_path``, ``down1``..``down3``) is what adapters change; the
Early Segmentation Head reads its deepest features and is what self-training
trains against the full network's prediction.

Weight files are safetensors (never pickle) with a JSON document under the
``convlora`` metadata key. The model id is the SHA-256 of the tensors (names,
dtypes, shapes and bytes, in sorted order), so it does not change when only the
metadata does, and adapters name the exact weights they were made for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import InputError
from .files import atomic_write
from .geometry import INTENSITY_SCALINGS, LEGACY_SCALING
from .shape_prior import METADATA_KEY as PRIOR_KEY
from .standardize import METADATA_KEY as LANDMARKS_KEY

MODEL_FORMAT = "convlora-model"
MODEL_FORMAT_VERSION = 1
METADATA_KEY = "convlora"
SCANNER_REFERENCE_KEY = "scanner_reference"  # napari_convlora.scanner_reference, for --adapter auto
ENCODER = ("init_path", "down1", "down2", "down3")


class PreActivation(nn.Sequential):
    """BN -> ReLU -> Conv: the unit of a pre-activation residual block."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel_size, padding=padding)
        )


class ResBlock(nn.Module):
    """Two pre-activation convs plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_path = nn.Sequential(PreActivation(channels, channels), PreActivation(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_path(x)


def _blocks(channels: int, n: int = 3) -> list[nn.Module]:
    return [ResBlock(channels) for _ in range(n)]


class UNet2D(nn.Module):
    """The segmentation network; ``forward`` returns one logit per pixel."""

    def __init__(self, base_width: int = 16) -> None:
        super().__init__()
        n = base_width
        self.base_width = base_width
        self.init_path = nn.Sequential(nn.Conv2d(1, n, 3, padding=1, bias=False), nn.ReLU(), *_blocks(n))
        self.down1 = self._down(n, 2 * n)
        self.down2 = self._down(2 * n, 4 * n)
        self.down3 = self._down(4 * n, 8 * n)
        self.up3 = self._up(8 * n, 4 * n)
        self.up2 = self._up(4 * n, 2 * n)
        self.up1 = self._up(2 * n, n)
        self.out_path = nn.Sequential(*_blocks(n), PreActivation(n, 1, kernel_size=1, padding=0), nn.BatchNorm2d(1))
        self.shortcut0 = nn.Conv2d(n, n, 1)
        self.shortcut1 = nn.Conv2d(2 * n, 2 * n, 1)
        self.shortcut2 = nn.Conv2d(4 * n, 4 * n, 1)

    @staticmethod
    def _down(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 2, stride=2, bias=False), nn.ReLU(), *_blocks(c_out)
        )

    @staticmethod
    def _up(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            *_blocks(c_in), nn.BatchNorm2d(c_in), nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False), nn.ReLU()
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = self.init_path(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        return x0, x1, x2, self.down3(x2)

    def decode(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x0, x1, x2, x3 = features
        up = self.up3(x3)
        up = self.up2(up + self.shortcut2(x2))
        up = self.up1(up + self.shortcut1(x1))
        return self.out_path(up + self.shortcut0(x0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encoder_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) for every module of the encoder, names as in ``named_modules``."""
        return [(name, m) for name, m in self.named_modules() if name.split(".")[0] in ENCODER]


def fold_batch_norms(unet: UNet2D) -> UNet2D:
    """``unet`` for inference only: in eval mode, each BN that directly follows a conv folded into that conv.

    Same function (up to float rounding; tested), 25 of the 56 BN passes fewer:
    the second BN of every residual block and the output BN. A BN before a
    conv (pre-activation) cannot be folded across its ReLU. A conv an adapter
    wraps (unmerged) is left as it is. In place (returns ``unet``): give it a
    copy of your own, e.g. what ``adapters.apply_adapter`` returns.
    """
    unet.eval()
    for block in unet.modules():
        if isinstance(block, ResBlock):
            first, second = block.conv_path
            _fold(first, 2, second, 0)
    _fold(unet.out_path[-2], 2, unet.out_path, len(unet.out_path) - 1)
    return unet


def _fold(conv_parent: nn.Sequential, conv_index: int, bn_parent: nn.Sequential, bn_index: int) -> None:
    conv, bn = conv_parent[conv_index], bn_parent[bn_index]
    if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
        conv_parent[conv_index] = fuse_conv_bn_eval(conv, bn)
        bn_parent[bn_index] = nn.Identity()


class EarlyHead(nn.Module):
    """Early Segmentation Head: a small conv head on the encoder output, upsampled to full size."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(c_in, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 1, 3, padding=1),
        )

    def forward(self, deepest: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.layers(deepest), size=size, mode="bilinear", align_corners=False)


@dataclass
class BaseModel:
    """The frozen source model: U-Net, early head, metadata and the id adapters refer to."""

    unet: UNet2D
    head: EarlyHead
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def model_id(self) -> str:
        return tensors_sha256(self.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return tensors

    @property
    def intensity_scaling(self) -> str:
        """How this model's inputs are scaled (:data:`~napari_convlora.geometry.INTENSITY_SCALINGS`)."""
        return self.metadata.get("intensity_scaling", LEGACY_SCALING)

    def copy(self) -> BaseModel:
        return BaseModel(copy.deepcopy(self.unet), copy.deepcopy(self.head), copy.deepcopy(self.metadata), self.path)

    def eval(self) -> BaseModel:
        self.unet.eval()
        self.head.eval()
        return self


def build_model(base_width: int = 16, intensity_scaling: str = "tissue") -> BaseModel:
    """A freshly initialised (untrained) model, for inputs scaled by ``intensity_scaling``."""
    if intensity_scaling not in INTENSITY_SCALINGS:
        choices = ", ".join(INTENSITY_SCALINGS)
        raise InputError(f"unknown intensity scaling {intensity_scaling!r}; choose one of {choices}")
    unet = UNet2D(base_width)
    metadata = {"architecture": architecture(base_width), "intensity_scaling": intensity_scaling}
    return BaseModel(unet, EarlyHead(8 * base_width), metadata)


def architecture(base_width: int) -> dict:
    return {"name": "UNet2D", "base_width": base_width, "in_channels": 1, "out_channels": 1, "early_head": "ESH"}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_model(model: BaseModel, path: str | os.PathLike, training: dict | None = None, overwrite: bool = True) -> str:
    """Write weights + metadata atomically; return the model id."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    model_id = tensors_sha256(tensors)
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "architecture": architecture(model.unet.base_width),
        "intensity_scaling": model.intensity_scaling,
        "model_id": model_id,
        "training": training if training is not None else model.metadata.get("training", {}),
    }
    # the size prior and the intensity landmarks of the training heads, the scanner reference of auto-pick
    for key in (PRIOR_KEY, LANDMARKS_KEY, SCANNER_REFERENCE_KEY):
        if key in model.metadata:
            metadata[key] = model.metadata[key]
    text = json.dumps(metadata)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}), overwrite=overwrite)
    return model_id


def read_metadata(path: Path, expected_format: str, version: int) -> dict:
    """The JSON metadata of a convlora safetensors file, or InputError saying what is wrong."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a safetensors file, or truncated ({exc})") from None
    if raw is None:
        raise InputError(f"{path}: has no '{METADATA_KEY}' metadata; not a {expected_format} file")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") != expected_format:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise InputError(f"{path}: is a {found!r} file, expected {expected_format!r}")
    found_version = metadata.get("format_version")
    if not isinstance(found_version, int) or isinstance(found_version, bool) or found_version < 1:
        raise InputError(f"{path}: invalid format_version {found_version!r}")
    if found_version > version:
        raise InputError(f"{path}: format version {found_version} is newer than this software reads ({version})")
    return metadata


def check_tensors(where, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], problem: str) -> None:
    """Refuse missing or unexpected tensor names, and wrong shapes or dtypes, naming the first few."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise InputError(f"{where}: {problem} (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise InputError(
                f"{where}: tensor {name} is {t.dtype}{tuple(t.shape)}, expected {want.dtype}{tuple(want.shape)}"
            )


def load_model(path: str | os.PathLike) -> BaseModel:
    """Load a model written by :func:`save_model`, checking format, architecture and tensors."""
    path = Path(path)
    metadata = read_metadata(path, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    arch = metadata.get("architecture")
    if (
        not isinstance(arch, dict)
        or arch.get("name") != "UNet2D"
        or not isinstance(arch.get("base_width"), int)
        or arch["base_width"] < 1
    ):
        raise InputError(f"{path}: unknown architecture {arch!r}")
    scaling = metadata.get("intensity_scaling", LEGACY_SCALING)
    if scaling not in INTENSITY_SCALINGS:
        raise InputError(f"{path}: unknown intensity scaling {scaling!r}")
    model = build_model(arch["base_width"], scaling)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: cannot read the tensors ({exc})") from None
    expected = model.state_dict()
    check_tensors(path, tensors, expected, "tensors do not match the architecture")
    model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    model.metadata = metadata
    model.path = path
    return model.eval()
