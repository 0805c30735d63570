"""Whole-volume inference: masks on the input's grid, clean-up, adapters, cancellation."""

from __future__ import annotations

import numpy as np
import torch

from napari_convlora.adapt import run_adaptation
from napari_convlora.adapters import apply_adapter
from napari_convlora.inference import Segmentation, SegmentProgress, clean_mask, iter_segment, segment

from .test_adapt import QUICK


def test_mask_lies_on_the_input_grid(model, small_volume):
    result = segment(model, small_volume, device="cpu", cleanup=False)
    assert result.mask.shape == small_volume.data.shape
    assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 1}
    assert result.adapter == "none"
    assert result.volume_ml == np.count_nonzero(result.mask) * 4.0**3 / 1000


def test_progress_then_result_and_stop(model, small_volume):
    reports = list(iter_segment(model, small_volume, device="cpu", batch_size=8))
    progress = [r for r in reports if isinstance(r, SegmentProgress)]
    assert progress[-1].done == progress[-1].total and len(progress) == -(-progress[-1].total // 8)
    assert isinstance(reports[-1], Segmentation)
    stopped = list(iter_segment(model, small_volume, device="cpu", batch_size=8, should_stop=lambda: True))
    assert stopped[-1] is None and len(stopped) == 2


def test_segment_with_adapter_and_merged_equals_unmerged(model, small_volume):
    adapter = run_adaptation(model, small_volume, QUICK).adapter
    with_adapter = segment(model, small_volume, adapter, device="cpu", cleanup=False)
    without = segment(model, small_volume, device="cpu", cleanup=False)
    assert with_adapter.adapter == adapter.name
    assert not np.allclose(with_adapter.probability, without.probability, atol=1e-4)
    # Merged (what segment uses) and unmerged adapted networks give the same probabilities.
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        merged = apply_adapter(model, adapter, merge=True)(x)
        unmerged = apply_adapter(model, adapter, merge=False)(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_clean_mask_keeps_the_largest_component_and_fills_holes():
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[5:20, 5:20, 5:20] = 1
    mask[10:13, 10:13, 10:13] = 0  # a hole
    mask[25:28, 25:28, 25:28] = 1  # a speck
    cleaned = clean_mask(mask)
    assert cleaned[11, 11, 11] == 1 and cleaned[26, 26, 26] == 0
    assert cleaned.sum() == 15**3
