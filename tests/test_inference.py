"""Whole-volume inference: masks on the input's grid, clean-up, adapters, cancellation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_convlora.adapt import run_adaptation
from napari_convlora.adapters import apply_adapter
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan
from napari_convlora.inference import (
    BRAIN_MARGIN_MM,
    SMOOTH_MM,
    Segmentation,
    SegmentProgress,
    brain_box,
    clean_mask,
    cpu_streams,
    inference_dtype,
    iter_segment,
    predict_logits,
    reusable_slices,
    segment,
    smooth_stack,
)

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


def test_clean_mask_cuts_a_thin_bridge_into_the_neck():
    """A strand two voxels wide joins the brain to a blob below it: the old largest-component rule kept both."""
    mask = np.zeros((40, 40, 60), np.uint8)
    mask[8:32, 8:32, 30:54] = 1  # the brain
    mask[19:21, 19:21, 14:30] = 1  # a thin strand down the neck
    mask[14:26, 14:26, 2:14] = 1  # a blob in the neck
    cleaned = clean_mask(mask)
    assert cleaned[:, :, :26].sum() == 0  # the blob and most of the strand are gone (a stub may stay)
    assert cleaned[8:32, 8:32, 30:54].all()  # the brain's own boundary (corners included) is kept
    assert cleaned[:, :, 30:].sum() == mask[:, :, 30:].sum()
    assert clean_mask(mask, bridge_voxels=0)[:, :, 2:14].any()  # no opening: the blob stays attached


def test_two_passes_report_progress_over_both_and_return_a_mask_on_the_grid(model, small_volume):
    geometry, _ = plan(small_volume, model.intensity_scaling)
    reports = list(iter_segment(model, small_volume, device="cpu", batch_size=8))
    assert isinstance(reports[-1], Segmentation) and reports[-1].mask.shape == small_volume.data.shape
    progress = [r for r in reports if isinstance(r, SegmentProgress)]
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert progress[-1].done == progress[-1].total
    coarse = len(range(0, geometry.n_slices, 3))
    assert coarse < progress[-1].total <= coarse + geometry.n_slices  # the fine pass reads at most the head
    one = [r for r in iter_segment(model, small_volume, device="cpu", batch_size=8, two_pass=False)]
    assert one[-2].done == one[-2].total == geometry.n_slices


def test_brain_box_holds_the_coarse_brain_and_ignores_a_strand(model, small_volume):
    geometry, _ = plan(small_volume, model.intensity_scaling)
    coarse = np.zeros(
        (len(range(0, geometry.n_slices, 3)), geometry.crop[1] - geometry.crop[0], geometry.crop[3] - geometry.crop[2]),
        np.float32,
    )
    coarse[3:9, 10:30, 15:35] = 1.0
    coarse[5, 19:21, 0:15] = 1.0  # one strand, one voxel thin, down to the edge
    box = brain_box(geometry, coarse, 3)
    lo = geometry.model_to_ras_box((3 * 3, 10, 15), (8 * 3 + 1, 30, 35))
    margins = [int(np.ceil(BRAIN_MARGIN_MM / s)) for s in geometry.ras_spacing]
    for (b0, b1), (l0, l1), m, n in zip(box, lo, margins, geometry.ras_shape, strict=True):
        assert b0 <= l0 and b1 >= l1  # the brain is inside
        assert b0 >= max(l0 - m - 3 * 4, 0) and b1 <= min(l1 + m + 3 * 4, n)  # and not stretched by the strand
    restricted = geometry.restricted(box)
    assert restricted.n_slices <= geometry.n_slices
    assert (restricted.crop[1] - restricted.crop[0]) % 8 == 0 and (restricted.crop[3] - restricted.crop[2]) % 8 == 0
    assert brain_box(geometry, np.zeros_like(coarse), 3) is None


def test_restricted_geometry_reads_the_same_voxels(small_volume):
    geometry, scaled = plan(small_volume, "tissue")
    full = geometry.to_model(scaled)
    np.testing.assert_array_equal(geometry.to_model(scaled, x_step=3), full[::3])  # the coarse pass's slices
    box = ((geometry.x_range[0] + 2, geometry.x_range[0] + 9), (10, 30), (12, 40))
    inner = geometry.restricted(box)
    part = inner.to_model(scaled)
    (y0, y1), (z0, z1) = (
        (max(inner.crop[i], geometry.crop[i]), min(inner.crop[i + 1], geometry.crop[i + 1])) for i in (0, 2)
    )
    assert y1 - y0 >= 16 and z1 - z0 >= 16
    np.testing.assert_array_equal(
        part[:, y0 - inner.crop[0] : y1 - inner.crop[0], z0 - inner.crop[2] : z1 - inner.crop[2]],
        full[2:9, y0 - geometry.crop[0] : y1 - geometry.crop[0], z0 - geometry.crop[2] : z1 - geometry.crop[2]],
    )
    back = inner.from_model(np.ones_like(part))
    ras = inner.to_ras(back)
    assert ras[: box[0][0]].sum() == 0 and ras[box[0][1] :].sum() == 0  # nothing outside the box's slices


def test_the_fine_pass_takes_the_coarse_pass_slices_from_it(small_volume):
    """A slice both passes read is the coarse logits on the brain's crop; pixels off the plane repeat the edge."""
    geometry, scaled = plan(small_volume, "tissue")
    full = geometry.to_model(scaled)
    coarse = np.random.default_rng(0).normal(size=full[::3].shape).astype(np.float32)
    box = ((geometry.x_range[0] + 2, geometry.x_range[0] + 14), (10, 30), (12, 40))
    fine = geometry.restricted(box)
    known = reusable_slices(geometry, fine, coarse, 3)
    positions = [x for x in range(*fine.x_range) if (x - geometry.x_range[0]) % 3 == 0]
    assert sorted(known) == [x - fine.x_range[0] for x in positions] and len(known) == 4
    (hy0, _, hz0, _), (fy0, fy1, fz0, fz1) = geometry.crop, fine.crop
    for i, x in zip(sorted(known), positions, strict=True):
        assert known[i].shape == (fy1 - fy0, fz1 - fz0)
        window = coarse[(x - geometry.x_range[0]) // 3, fy0 - hy0 : fy1 - hy0, fz0 - hz0 : fz1 - hz0]
        np.testing.assert_array_equal(known[i], window)  # the brain's crop lies inside the head's here
    # a crop reaching off the plane: those pixels repeat the edge; a crop outside the head's: nothing reused
    head = replace(geometry, crop=(0, geometry.plane_shape[0], *geometry.crop[2:]))
    rows = (
        np.random.default_rng(1).normal(size=(len(coarse), geometry.plane_shape[0], coarse.shape[2])).astype(np.float32)
    )
    edge = reusable_slices(head, replace(fine, crop=(-8, fy1, fz0, fz1)), rows, 3)
    i = sorted(edge)[0]
    np.testing.assert_array_equal(
        edge[i][8:], rows[(fine.x_range[0] + i - geometry.x_range[0]) // 3, :fy1, fz0 - hz0 : fz1 - hz0]
    )
    np.testing.assert_array_equal(edge[i][:8], np.repeat(edge[i][8:9], 8, axis=0))
    assert reusable_slices(replace(geometry, crop=(fy0 + 1, *geometry.crop[1:])), fine, coarse, 3) == {}


def test_two_passes_read_each_slice_once(model, small_volume, monkeypatch):
    """The fine pass leaves out the slices the coarse pass read; with mirror views it reads them all again."""
    from napari_convlora import inference

    read = []
    predict = inference.predict_logits
    monkeypatch.setattr(
        inference, "predict_logits", lambda unet, stack, *a: read.append(len(stack)) or predict(unet, stack, *a)
    )
    segment(model, small_volume, device="cpu")
    coarse_slices, fine_slices = read
    read.clear()
    segment(model, small_volume, device="cpu", tta=2)
    assert read[0] == coarse_slices and read[1] > fine_slices


def test_precision_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert inference_dtype(cpu, "float32") == torch.float32
    assert inference_dtype(cpu, "bfloat16") == torch.bfloat16
    assert inference_dtype(torch.device("cuda"), "auto") == torch.float32
    monkeypatch.setattr("napari_convlora.inference.bf16_supported", lambda: False)
    assert inference_dtype(cpu, "auto") == torch.float32  # emulated bf16 would be slower
    monkeypatch.setattr("napari_convlora.inference.bf16_supported", lambda: True)
    assert inference_dtype(cpu, "auto") == torch.bfloat16
    with pytest.raises(InputError, match="unknown precision 'half'"):
        inference_dtype(cpu, "half")


def test_two_cpu_streams_give_the_same_logits_in_order_and_restore_the_threads(model, small_volume, monkeypatch):
    """Batches computed two at once come back in order, equal to one at a time; torch's threads are put back."""
    cpu = torch.device("cpu")
    geometry, scaled = plan(small_volume, model.intensity_scaling)
    stack = geometry.to_model(scaled)[:11]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu_streams(cpu, 3) == 2 and cpu_streams(cpu, 1) == 1 and cpu_streams(torch.device("cuda"), 3) == 1
        together = list(predict_logits(model.unet, stack, cpu, 2, "float32"))
        assert torch.get_num_threads() == 2
        assert [start for start, _ in together] == [0, 2, 4, 6, 8, 10]
        generator = predict_logits(model.unet, stack, cpu, 2, "float32")
        next(generator)
        assert torch.get_num_threads() == 1  # each stream on one thread while the stack is read
        generator.close()  # a cancelled segmentation: the threads come back too
        assert torch.get_num_threads() == 2
        monkeypatch.setattr("napari_convlora.inference.cpu_streams", lambda device, batches: 1)
        alone = list(predict_logits(model.unet, stack, cpu, 2, "float32"))
    finally:
        torch.set_num_threads(threads)
    for (a_start, a), (b_start, b) in zip(together, alone, strict=True):
        assert a_start == b_start
        np.testing.assert_allclose(a, b, atol=1e-5)  # one thread or two: float sums in another order


def test_mirror_views_average_the_mirrored_predictions(model, small_volume):
    """--tta N: the logits are those of the mean probability over the N mirror images, each mapped back."""
    unet = model.unet.eval()
    geometry, scaled = plan(small_volume, model.intensity_scaling)
    stack = geometry.to_model(scaled)[:6]
    plain = np.concatenate([b for _, b in predict_logits(unet, stack, torch.device("cpu"), 4, "float32")])
    with torch.inference_mode():
        x = torch.from_numpy(stack[:, None])
        views = [unet(x), unet(x.flip(2)).flip(2), unet(x.flip(3)).flip(3), unet(x.flip((2, 3))).flip((2, 3))]
    probability = [v[:, 0].sigmoid().numpy() for v in views]
    for tta, expected in ((2, np.mean(probability[:2], axis=0)), (4, np.mean(probability, axis=0))):
        logits = np.concatenate([b for _, b in predict_logits(unet, stack, torch.device("cpu"), 4, "float32", tta)])
        assert logits.shape == plain.shape
        np.testing.assert_allclose(1 / (1 + np.exp(-logits)), expected, atol=1e-5)
        assert not np.allclose(logits, plain, atol=1e-3)  # a random model is not mirror-symmetric: the views count


def test_mirror_views_in_segment_and_bad_counts(model, small_volume):
    one = segment(model, small_volume, device="cpu", cleanup=False)
    four = segment(model, small_volume, device="cpu", cleanup=False, tta=4)
    assert four.mask.shape == one.mask.shape and not np.allclose(four.probability, one.probability)
    for bad in (0, 3, 8):
        with pytest.raises(InputError, match="test-time views must be one of 1, 2, 4"):
            segment(model, small_volume, device="cpu", tta=bad)


def test_smoothing_removes_a_thin_spike_and_keeps_a_solid_block(small_volume):
    """The probability is smoothed in mm along every axis: a one-slice spike goes, a block's core stays."""
    geometry, _ = plan(small_volume, "tissue")
    n, h, w = geometry.n_slices, geometry.crop[1] - geometry.crop[0], geometry.crop[3] - geometry.crop[2]
    stack = np.zeros((n, h, w), np.float32)
    stack[n // 4 : 3 * n // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    stack[n // 2, 3 * h // 4 :, w // 2] = 1.0  # a spike one voxel thin out of the block
    smoothed = smooth_stack(stack.copy(), geometry, SMOOTH_MM)
    assert smoothed.shape == stack.shape and smoothed.dtype == np.float32
    assert smoothed[n // 2, h - 2, w // 2] < 0.5  # the spike's far end is gone
    assert smoothed[n // 2, h // 2, w // 2] > 0.99  # the block's core is not
    assert abs((smoothed > 0.5).sum() / (stack > 0.5).sum() - 1) < 0.15  # the block keeps about its size


def test_segment_smooths_what_it_thresholds_not_the_probability(model, small_volume, monkeypatch):
    from napari_convlora import inference

    calls = []
    monkeypatch.setattr(inference, "smooth_stack", lambda s, g, mm: calls.append(mm) or np.zeros_like(s))
    raw = segment(model, small_volume, device="cpu", cleanup=False, smooth_mm=0)
    assert calls == [] and np.array_equal(raw.mask, (raw.probability > 0.5).astype(np.uint8))
    smoothed = segment(model, small_volume, device="cpu", cleanup=False)
    assert calls == [SMOOTH_MM] and not smoothed.mask.any()  # the mask is the smoothed stack's (zeros here)
    np.testing.assert_array_equal(smoothed.probability, raw.probability)  # what the gates score stays the network's
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="smoothing must be 0 or more mm"):
            segment(model, small_volume, device="cpu", smooth_mm=bad)
