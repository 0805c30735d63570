"""Device choice: auto falls back to the CPU; an unavailable explicit choice is a clear error."""

from __future__ import annotations

import pytest
import torch

from napari_convlora.device import pick_device
from napari_convlora.errors import InputError


def test_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    assert pick_device("auto").type in ((expected,) if expected else ("mps", "cpu"))


def test_unknown_or_unavailable_devices_are_refused(monkeypatch):
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type in ("mps", "cpu")
