"""Automatic adapter choice, without labels: the candidate whose two heads agree best on the scan.

The ConvLoRA paper selects the training epoch, without labels, by the agreement
between the early head's and the full network's masks on the target slices
(2D surface Dice @ 1 mm, :func:`napari_convlora.adapt.agreement`); a model that
fits a scanner well gives consistent answers at both depths. The same
criterion ranks the source model and every library adapter made for this base
model on a handful of slices of the scan, and the best one is chosen. It is a
proxy, not a measurement of accuracy: the reason string says so and gives the
scores, so the user can see why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapt import agreement, select_slices
from .adapters import Adapter, apply_adapter, load_adapter
from .device import pick_device
from .errors import InputError
from .geometry import plan
from .model import BaseModel
from .nifti import Volume

SOURCE = "source"


@dataclass
class AutoChoice:
    adapter: Adapter | None  # None: the source model
    label: str  # "source" or the adapter's name
    scores: dict[str, float]  # candidate -> agreement (higher is better)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not scored

    @property
    def reason(self) -> str:
        ranked = ", ".join(f"{name} {score:.3f}" for name, score in sorted(self.scores.items(), key=lambda kv: -kv[1]))
        text = f"auto chose {self.label}: best agreement of early head and final mask, no labels used ({ranked})"
        if self.skipped:
            text += f"; skipped {', '.join(sorted(self.skipped))} (made for another model or unreadable)"
        return text


def choose_adapter(
    base: BaseModel, volume: Volume, candidates: Sequence[Path], device: str = "auto", slices: int = 10
) -> AutoChoice:
    """Score the source model and each adapter file in ``candidates`` on ``slices`` slices; pick the best."""
    torch_device = pick_device(device)
    geometry, scaled = plan(volume)
    stack = geometry.to_model(scaled)
    images = torch.from_numpy(stack[select_slices(stack, slices)][:, None].copy()).to(torch_device)
    head = base.copy().head.to(torch_device).eval()
    found: dict[str, Adapter | None] = {SOURCE: None}
    scores = {SOURCE: agreement(base.copy().unet.to(torch_device), head, images, geometry, batch_size=4)}
    skipped: dict[str, str] = {}
    for path in candidates:
        try:
            adapter = load_adapter(path)
            unet = apply_adapter(base, adapter).to(torch_device)
        except InputError as exc:
            skipped[Path(path).stem] = str(exc)
            continue
        name = adapter.name or Path(path).stem
        if name in scores:  # a user adapter shadows a built-in of the same name, as in the library
            continue
        found[name] = adapter
        scores[name] = agreement(unet, head, images, geometry, batch_size=4)
    best = max(scores, key=lambda name: (scores[name], name == SOURCE))
    return AutoChoice(found[best], best, scores, skipped)
