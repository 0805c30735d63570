"""Automatic adapter choice, without labels: which candidate's domain fits the scan best.

Two label-free criteria rank the source model and every library adapter made
for this base model, on the same handful of slices of the scan that adaptation
would read (:func:`napari_convlora.geometry.select_slices`):

- ``stats`` (the default): how well the scan's encoder feature statistics match
  the candidate's scanner. The scan is run through the candidate's encoder and
  its per-channel feature statistics at every encoder BN are compared with the
  candidate's. Where the model file carries a scanner reference learnt over
  several heads (:mod:`napari_convlora.scanner_reference`), every candidate is
  scored by the anatomy-weighted distance from its reference, measured with the
  source reference's head-to-head spreads (an adapter file without a reference
  is represented by its AdaBN statistics; an intensity adapter, which changes no
  weight, by the source model's reference, read on the slices through its map);
  otherwise by the KL divergence from the
  BN statistics it carries (an adapter's AdaBN statistics *are* the feature
  statistics of its own scanner, but of one head). The score is 1 / (1 + distance),
  or exp(-KL): 1 when the statistics match.
- ``agreement``: the ConvLoRA paper's epoch-selection criterion, the 2D surface
  Dice between the early head's and the final masks (a model that fits a scanner
  gives consistent answers at both depths).
- ``consistency``: the score adaptation selects and gates with
  (:func:`napari_convlora.selection.consistency`): how stable the mask stays
  under noise, bias and blur. An adapter must beat the source model by the
  gate's margin to be chosen, as a new adapter must to be accepted.

All are proxies, not accuracy: the reason string says which was used and gives
every score, so the user can see why. Before a picked adapter's mask is used,
:func:`iter_segment_checked` puts it through the do-no-harm gate of adaptation:
the whole scan is segmented with the source model too, and the adapter is kept
only if its mask is more confident (:func:`napari_convlora.selection.mask_confidence`).
``scripts/bench_autopick.py`` measures how often each criterion picks the right
scanner and what the pick costs in surface Dice, with and without that check.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapt import agreement
from .adapters import Adapter, apply_adapter, load_adapter
from .device import pick_device
from .errors import InputError
from .geometry import plan, select_slices
from .inference import Segmentation, SegmentProgress, iter_segment
from .library import ADAPTER_SUFFIX
from .model import BaseModel, UNet2D
from .nifti import Volume
from .scanner_reference import (
    ScannerReference,
    feature_moments,
    from_batchnorms,
    reference_from_metadata,
    with_encoder_bn_inputs,
)
from .selection import (
    GATE_MARGIN,
    accepted_by_confidence,
    consistency,
    iter_source_and_adapted,
    mask_confidence,
)

SOURCE = "source"
CRITERIA = {
    "stats": "fit of the scan's encoder feature statistics to the candidate's scanner statistics",
    "agreement": "agreement of early head and final mask (2D surface Dice @ 1 mm)",
    "consistency": "stability of the mask under noise, bias and blur (Dice), adapters needing the gate's margin",
}
DEFAULT_CRITERION = "stats"


@dataclass
class AutoChoice:
    adapter: Adapter | None  # None: the source model
    label: str  # "source" or the adapter's name
    scores: dict[str, float]  # candidate -> score (higher is better)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not scored
    criterion: str = DEFAULT_CRITERION
    basis: str = ""  # what the scores were measured against, where the criterion has more than one way

    @property
    def reason(self) -> str:
        ranked = ", ".join(f"{name} {score:.3f}" for name, score in sorted(self.scores.items(), key=lambda kv: -kv[1]))
        basis = f" {self.basis}" if self.basis else ""
        text = f"auto chose {self.label}: best {CRITERIA[self.criterion]}{basis}, no labels used ({ranked})"
        if self.skipped:
            text += f"; skipped {', '.join(sorted(self.skipped))} (made for another model or unreadable)"
        return text


def statistics_fit(unet: UNet2D, images: torch.Tensor) -> float:
    """exp(-mean KL) between the features of ``images`` at each encoder BN and that BN's stored statistics.

    KL(N(m, v) || N(mu, var)) per channel, with (m, v) the scan's feature mean and
    variance over all pixels of all slices, and (mu, var) the running statistics
    the BN normalises with; averaged over channels, then over layers so that every
    depth counts the same.
    """
    divergences: list[float] = []

    def measure(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> None:
        m, v = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)) + bn.eps  # unbiased, as BN's running_var
        mu, var = bn.running_mean.double(), bn.running_var.double() + bn.eps
        kl = 0.5 * (v / var + (m - mu) ** 2 / var - 1.0 - torch.log(v / var))
        divergences.append(float(kl.mean()))

    with_encoder_bn_inputs(unet, images, measure)
    return float(np.exp(-np.mean(divergences)))


def choose_adapter(
    base: BaseModel,
    volume: Volume,
    candidates: Sequence[Path],
    device: str = "auto",
    slices: int = 10,
    criterion: str = DEFAULT_CRITERION,
) -> AutoChoice:
    """Score the source model and each adapter file in ``candidates`` on ``slices`` slices; pick the best.

    Candidates are named by their file name (the library name, which an import may
    have chosen over the name inside the file); the first file of a name wins, so
    pass built-ins first. Ties go to the source model. A candidate that cannot be
    read or was made for another base model is skipped, with the reason kept in
    ``skipped``.
    """
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    torch_device = pick_device(device)
    geometry, scaled = plan(volume, base.intensity_scaling)
    stack = geometry.to_model(scaled)
    images = torch.from_numpy(stack[select_slices(stack, slices)][:, None].copy()).to(torch_device)
    head = base.copy().head.to(torch_device).eval()
    source_reference = None
    if criterion == "stats":
        source_reference = reference_from_metadata(base.path or "the model", base.metadata, base.unet)

    def score(unet: UNet2D, reference: ScannerReference | None, seen: torch.Tensor = images) -> float:
        """``seen``: the slices as the candidate reads them (through an intensity adapter's map)."""
        unet = unet.to(torch_device)
        if criterion == "stats" and source_reference is not None:
            # one metric for every candidate: the source model's head-to-head spreads
            reference = (reference or from_batchnorms(unet, source_reference)).with_spreads_of(source_reference)
            # 1 / (1 + d), not exp(-d): a scan far from every reference must not round every score to 0 (a tie)
            return 1.0 / (1.0 + reference.distance(feature_moments(unet, seen)))
        if criterion == "stats":
            return statistics_fit(unet, seen)
        if criterion == "consistency":
            return consistency(unet, seen, batch_size=4)
        return agreement(unet, head, seen, geometry, batch_size=4)

    found: dict[str, Adapter | None] = {SOURCE: None}
    scores = {SOURCE: score(base.copy().unet, source_reference)}
    skipped: dict[str, str] = {}
    for path in candidates:
        name = Path(path).name.removesuffix(ADAPTER_SUFFIX)
        if name in scores or name in skipped:
            continue
        try:
            adapter = load_adapter(path)
            unet = apply_adapter(base, adapter)
            reference = reference_from_metadata(path, adapter.metadata, unet) if source_reference else None
        except InputError as exc:
            skipped[name] = str(exc)
            continue
        found[name] = adapter
        if adapter.curve is not None:  # the source model on the scan through the map: near the training heads?
            mapped = torch.from_numpy(adapter.curve.apply(images.cpu().numpy().copy())).to(torch_device)
            scores[name] = score(unet, source_reference, mapped)
        else:
            scores[name] = score(unet, reference)
    margin = {SOURCE: GATE_MARGIN if criterion == "consistency" else 0.0}
    best = max(scores, key=lambda name: (scores[name] + margin.get(name, 0.0), name == SOURCE))
    basis = ""
    if criterion == "stats":
        basis = "(KL to each candidate's BN statistics, score exp(-KL))"
        if source_reference is not None:
            basis = f"(anatomy-weighted distance d to references learnt over {len(source_reference.heads)} heads, "
            basis += "score 1/(1+d))"
    return AutoChoice(found[best], best, scores, skipped, criterion, basis)


@dataclass
class CheckedSegmentation:
    segmentation: Segmentation
    label: str  # what made the mask: "source" or the kept adapter's name
    note: str  # the choice and the gate's verdict, for the user


def iter_segment_checked(
    base: BaseModel,
    volume: Volume,
    choice: AutoChoice,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    source: Segmentation | None = None,
    **segment_options,
) -> Generator[SegmentProgress, None, CheckedSegmentation | None]:
    """Segment with the auto-picked model, keeping a picked adapter only if the do-no-harm gate passes it.

    A picked adapter costs one more segmentation (the source model's, for the gate,
    unless the caller passes it as ``source``); progress counts both. None if
    ``should_stop`` said so.
    """
    if choice.adapter is None and source is not None:
        return CheckedSegmentation(source, SOURCE, choice.reason)
    if choice.adapter is None:
        result = None
        for report in iter_segment(base, volume, None, device=device, should_stop=should_stop, **segment_options):
            if isinstance(report, SegmentProgress):
                yield report
            result = report
        return None if result is None else CheckedSegmentation(result, SOURCE, choice.reason)
    pair = yield from iter_source_and_adapted(
        base, volume, choice.adapter, device, should_stop, source=source, **segment_options
    )
    if pair is None:
        return None
    source, picked = pair
    ours, theirs = mask_confidence(picked.probability, picked.mask), mask_confidence(source.probability, source.mask)
    verdict = f"mask confidence {ours:.4f} against the source model's {theirs:.4f}"
    if accepted_by_confidence(ours, theirs):
        return CheckedSegmentation(picked, choice.label, f"{choice.reason}; do-no-harm check passed ({verdict})")
    note = f"{choice.reason}; but its mask is not surer than the source model's by the gate's margin ({verdict})"
    note += ": source model kept"
    return CheckedSegmentation(source, SOURCE, note)
