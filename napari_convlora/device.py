"""Choice of the torch device: CUDA, then Apple MPS, then CPU, or exactly what the user asked for."""

from __future__ import annotations

import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes the first available of cuda, mps, cpu; an unavailable explicit choice is an InputError."""
    if name not in DEVICE_CHOICES:
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if name == "mps" and not _mps_available():
        raise InputError("device mps was asked for, but Apple MPS is not available (use --device cpu or auto)")
    return torch.device(name)
