"""The size prior: learnt from masks, stored with the model, and a loss that pulls the area towards it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.library import default_model_path
from napari_convlora.model import load_model, save_model
from napari_convlora.shape_prior import (
    BINS,
    METADATA_KEY,
    MIN_SPREAD_MM2,
    ShapePrior,
    learn_shape_prior,
    slice_positions,
)
from napari_convlora.training import TrainConfig, TrainDone, load_heads, train_source


def _discs(radius: float, n: int = 40, size: int = 48) -> np.ndarray:
    """A ball of ``radius`` as n sagittal slices: each a disc, biggest in the middle."""
    x = (np.arange(n) + 0.5) / n * 2 - 1
    yy, zz = np.mgrid[:size, :size] - size / 2 + 0.5
    return np.stack([(yy**2 + zz**2) <= max(radius**2 * (1 - t**2), 0) for t in x]).astype(np.float32)


def test_learnt_prior_follows_the_masks_and_keeps_a_spread():
    prior = learn_shape_prior([_discs(18), _discs(20), _discs(22)])
    assert len(prior.mean_mm2) == BINS and prior.heads == 3
    middle = BINS // 2
    assert prior.mean_mm2[middle] == pytest.approx(np.pi * 20**2, rel=0.06)  # the middle slices: the 20-voxel disc
    assert prior.mean_mm2[0] < prior.mean_mm2[middle] / 4  # small at the sides
    assert prior.spread_mm2[middle] >= 0.1 * prior.mean_mm2[middle]
    assert min(prior.spread_mm2) >= MIN_SPREAD_MM2
    again = ShapePrior.from_metadata({METADATA_KEY: prior.as_metadata()}, "x")
    assert again.mean_mm2 == pytest.approx(prior.mean_mm2, abs=0.06)


def test_loss_is_zero_at_the_prior_and_pulls_a_leak_back():
    prior = ShapePrior(mean_mm2=(400.0,) * BINS, spread_mm2=(40.0,) * BINS, heads=2)
    positions = slice_positions([3, 7], 10)
    logits = torch.full((2, 1, 20, 20), 20.0)  # all 400 pixels brain: exactly the prior's area
    assert float(prior.loss(logits, positions)) == pytest.approx(0.0, abs=1e-6)
    leak = torch.full((2, 1, 30, 30), 2.0, requires_grad=True)  # 900 pixels at p = 0.88: ~9.8 spreads too big
    loss = prior.loss(leak, positions)
    z = (900 * torch.sigmoid(torch.tensor(2.0)).item() - 400) / 40
    assert loss.item() == pytest.approx(0.5 * z**2, rel=1e-4)
    loss.backward()
    assert (leak.grad >= 0).all() and leak.grad.sum() > 0  # descending it shrinks the mask


@pytest.mark.parametrize(
    "broken",
    [{}, {METADATA_KEY: {"mean_mm2": [1.0], "spread_mm2": [0.0], "heads": 1}}, {METADATA_KEY: {"mean_mm2": "x"}}],
)
def test_a_model_without_a_usable_prior_is_refused_by_name(broken):
    with pytest.raises(InputError, match=r"model\.safetensors"):
        ShapePrior.from_metadata(broken, "model.safetensors")


def test_the_prior_objectives_need_a_prior_and_fail_before_any_work(model, small_volume):
    with pytest.raises(InputError, match="no shape prior"):
        run_adaptation(model, small_volume, AdaptConfig(objective="shape-prior", device="cpu"))


def test_prior_survives_save_and_load_and_leaves_the_model_id(tmp_path, model):
    with_prior = model.copy()
    with_prior.metadata[METADATA_KEY] = learn_shape_prior([_discs(18), _discs(21)]).as_metadata()
    model_id = save_model(with_prior, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert model_id == model.model_id == loaded.model_id
    assert loaded.metadata[METADATA_KEY] == with_prior.metadata[METADATA_KEY]


def test_train_source_learns_the_prior_from_its_heads(small_path, small_mask_path):
    heads = load_heads([(small_path, small_mask_path)])
    config = TrainConfig(width=4, steps=1, head_steps=1, batch_size=2, crop=(32, 32), device="cpu")
    done = next(r for r in train_source(heads, config) if isinstance(r, TrainDone))
    prior = ShapePrior.from_metadata(done.model.metadata, "trained")
    assert prior.heads == 1
    assert max(prior.mean_mm2) == pytest.approx(heads[0].masks.sum(axis=(1, 2)).max(), rel=0.25)


def test_the_shipped_model_carries_a_prior_from_its_eight_heads():
    prior = ShapePrior.from_metadata(load_model(default_model_path()).metadata, "shipped")
    assert prior.heads == 8 and len(prior.mean_mm2) == BINS
    assert 10_000 < max(prior.mean_mm2) < 25_000  # a mid-sagittal brain slice: 100 to 250 cm^2


def test_cli_adapt_with_a_prior_objective_on_a_model_without_one_fails_cleanly(
    capsys, tmp_path, monkeypatch, small_path, model
):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    model_file = tmp_path / "old.safetensors"  # a model made before train-source wrote priors
    save_model(model, model_file, training={"command": "tests: random weights"})
    out = tmp_path / "a.safetensors"
    code = main(["adapt", str(small_path), "-o", str(out), "--model", str(model_file), "--objective", "shape-prior"])
    err = capsys.readouterr().err
    assert code == 2 and "no shape prior" in err and str(model_file) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_benchmark_refuses_prior_methods_on_a_model_without_one_before_any_cell(model, small_volume):
    from napari_convlora.benchmark import run_benchmark

    cells = run_benchmark(model, small_volume, small_volume, ["ge-3t"], [0], ["source", "stats+prior"])
    with pytest.raises(InputError, match="no shape prior"):
        next(cells)
