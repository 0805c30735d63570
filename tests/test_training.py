"""Source training: augmentation, loss going down, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.model import load_model
from napari_convlora.training import (
    TrainConfig,
    TrainDone,
    TrainStep,
    augment,
    contrast_curve,
    load_heads,
    step_batch,
    train_source,
)


@pytest.fixture(scope="module")
def heads(small_path, small_mask_path):
    return load_heads([(small_path, small_mask_path)])


TINY = TrainConfig(
    steps=6, head_steps=2, batch_size=2, lr=3e-3, crop=(64, 64), width=4, seed=0, device="cpu", checkpoint_every=3
)


def test_augment_is_seeded_and_keeps_masks_binary(heads):
    image, mask = heads[0].images[20], heads[0].masks[20]
    a = augment(image, mask, np.random.default_rng(1), (64, 48))
    b = augment(image, mask, np.random.default_rng(1), (64, 48))
    assert a[0].shape == a[1].shape == (64, 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= {0.0, 1.0}


def test_contrast_curves_keep_the_t1_tissue_order_and_change_only_the_image(heads):
    ramp = np.linspace(0.0, 0.6, 61, dtype=np.float32)  # background up to white matter on the "tissue" scale
    for seed in range(20):
        out = contrast_curve(ramp, np.random.default_rng(seed))
        assert out[0] == 0.0 and np.all(np.diff(out) > 0), seed  # CSF < grey < white kept
        assert 0.45 - 1e-6 <= out[-1] <= 0.75 + 1e-6
    image, mask = heads[0].images[20], heads[0].masks[20]
    plain = augment(image, mask, np.random.default_rng(3), (64, 48), contrast_curves=0.0)
    curved = augment(image, mask, np.random.default_rng(3), (64, 48), contrast_curves=1.0)
    assert np.array_equal(plain[1], curved[1])  # same geometry, same mask
    assert not np.allclose(plain[0], curved[0])
    # 0 draws nothing more from the generator: the batches of recipes made before the option are unchanged
    assert np.array_equal(plain[0], augment(image, mask, np.random.default_rng(3), (64, 48))[0])
    half = TrainConfig(**{**TINY.__dict__, "batch_size": 16, "contrast_curves": 0.5})
    with_curves, without = (
        step_batch(heads, half, 1)[0],
        step_batch(heads, TINY.__class__(**{**half.__dict__, "contrast_curves": 0.0}), 1)[0],
    )
    changed = [not np.array_equal(a, b) for a, b in zip(with_curves, without, strict=True)]
    assert 0 < sum(changed) < len(changed)  # about half of the crops, not all, not none


def test_a_few_steps_lower_the_loss(heads):
    config = TrainConfig(**{**TINY.__dict__, "steps": 30, "head_steps": 1})
    losses = [r.loss for r in train_source(heads, config) if isinstance(r, TrainStep) and r.phase == "unet"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_resume_continues_exactly(tmp_path, heads):
    straight = next(r for r in train_source(heads, TINY) if isinstance(r, TrainDone)).model
    checkpoint = tmp_path / "run.checkpoint"
    seen = []

    def stop_at_step_5() -> bool:
        return len(seen) >= 5

    for report in train_source(heads, TINY, checkpoint, should_stop=stop_at_step_5):
        seen.append(report)
    assert checkpoint.exists() and len(seen) == 5
    resumed_reports = list(train_source(heads, TINY, checkpoint))
    assert [r.step for r in resumed_reports if isinstance(r, TrainStep)] == [4, 5, 6, 7, 8]  # from checkpoint 3
    resumed = resumed_reports[-1].model
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_refuses_other_settings_or_data(tmp_path, heads, small_path, small_mask_path):
    checkpoint = tmp_path / "run.checkpoint"
    stop = iter([False, False, False, True])
    list(train_source(heads, TINY, checkpoint, should_stop=lambda: next(stop)))
    assert checkpoint.exists()
    with pytest.raises(InputError, match="other settings or data"):
        list(train_source(heads, TrainConfig(**{**TINY.__dict__, "steps": 4}), checkpoint))
    with pytest.raises(InputError, match="other settings or data"):
        list(train_source(heads, TrainConfig(**{**TINY.__dict__, "contrast_curves": 0.5}), checkpoint))
    flipped = load_heads([(small_path, small_mask_path)])
    flipped[0].masks[:] = 1 - flipped[0].masks
    with pytest.raises(InputError, match="other settings or data"):
        list(train_source(flipped, TINY, checkpoint))


def test_heads_and_model_share_one_intensity_scaling(heads, small_path, small_mask_path):
    legacy = TrainConfig(**{**TINY.__dict__, "intensity_scaling": "percentile"})
    with pytest.raises(InputError, match="not scaled with 'percentile'"):
        next(iter(train_source(heads, legacy)))
    legacy_heads = load_heads([(small_path, small_mask_path)], "percentile")
    assert not np.allclose(legacy_heads[0].images, heads[0].images)
    config = TrainConfig(**{**legacy.__dict__, "steps": 1, "head_steps": 1})
    done = next(r for r in train_source(legacy_heads, config) if isinstance(r, TrainDone))
    assert done.model.intensity_scaling == "percentile"


def test_resume_in_the_head_phase(tmp_path, heads):
    straight = next(r for r in train_source(heads, TINY) if isinstance(r, TrainDone)).model
    checkpoint = tmp_path / "run.checkpoint"
    stop = iter([False] * 7 + [True])
    list(train_source(heads, TINY, checkpoint, should_stop=lambda: next(stop)))  # stops at step 8 (head phase)
    resumed = list(train_source(heads, TINY, checkpoint))
    assert [r.step for r in resumed if isinstance(r, TrainStep)] == [7, 8]  # checkpoint after unet step 6
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed[-1].model.state_dict()[key]), key


def test_train_source_cli_records_how_the_weights_were_made(capsys, tmp_path, small_path, small_mask_path):
    out = tmp_path / "model.safetensors"
    code = main(
        [
            "train-source",
            "--head",
            str(small_path),
            str(small_mask_path),
            "-o",
            str(out),
            "--steps",
            "2",
            "--head-steps",
            "1",
            "--width",
            "4",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--intensity-scaling",
            "percentile",
            "--contrast-curves",
            "0.5",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    model = load_model(out)
    assert result["model_id"] == model.model_id
    assert model.intensity_scaling == "percentile" and model.metadata["training"]["config"]["intensity_scaling"]
    training = model.metadata["training"]
    assert "train-source" in training["command"] and training["config"]["seed"] == 0
    assert training["config"]["contrast_curves"] == 0.5
    assert len(training["data"][0]["t1_sha256"]) == 64
    assert not (tmp_path / "model.safetensors.checkpoint").exists()


def test_init_starts_from_the_given_weights_and_binds_the_checkpoint(tmp_path, heads):
    first = next(r for r in train_source(heads, TINY) if isinstance(r, TrainDone)).model
    still = TrainConfig(**{**TINY.__dict__, "lr": 1e-12, "steps": 1, "head_steps": 1})
    from_first = next(r for r in train_source(heads, still, init=first) if isinstance(r, TrainDone)).model
    from_scratch = next(r for r in train_source(heads, still) if isinstance(r, TrainDone)).model
    for key, value in first.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(from_first.state_dict()[key], value, rtol=0, atol=1e-6)
    assert not torch.equal(
        from_scratch.state_dict()["unet.init_path.0.weight"], first.state_dict()["unet.init_path.0.weight"]
    )
    checkpoint = tmp_path / "run.checkpoint"
    list(train_source(heads, still, checkpoint, init=first))
    with pytest.raises(InputError, match="other settings or data"):
        list(train_source(heads, still, checkpoint))  # the same run without its initial weights
    wide = TrainConfig(**{**still.__dict__, "width": 8})
    with pytest.raises(InputError, match="not a 8-wide model"):
        list(train_source(heads, wide, init=first))


def test_worker_processes_make_the_same_batches_and_model(heads):
    from napari_convlora.training import _batches, step_batch

    config = TrainConfig(**{**TINY.__dict__, "workers": 2})
    steps = range(3, 9)
    made = list(_batches(heads, config, steps))
    assert len(made) == len(steps)
    for step, (x, y) in zip(steps, made, strict=True):
        x0, y0 = step_batch(heads, TINY, step)
        assert np.array_equal(x, x0) and np.array_equal(y, y0)
    alone = next(r for r in train_source(heads, TINY) if isinstance(r, TrainDone)).model
    helped = next(r for r in train_source(heads, config) if isinstance(r, TrainDone)).model
    for key, value in alone.state_dict().items():
        assert torch.equal(value, helped.state_dict()[key]), key
