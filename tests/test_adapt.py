"""The self-training engine: reports, cancellation, reproducibility, and a base model never touched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_convlora.adapt import (
    AdaptCancelled,
    AdaptConfig,
    AdaptDone,
    EpochReport,
    GateProgress,
    StepReport,
    adapt,
    reestimate_bn,
    run_adaptation,
    select_slices,
)
from napari_convlora.adapters import apply_adapter, encoder_batchnorms, inject_convlora, moe_layers
from napari_convlora.errors import InputError
from napari_convlora.inference import segment
from napari_convlora.selection import confidence_margin, mask_confidence

QUICK = AdaptConfig(objective="early-head", slices=4, epochs=2, batch_size=2, lr=1e-3, seed=0, device="cpu")


def test_reports_in_order_and_a_usable_adapter(model, small_volume):
    before = model.model_id
    reports = list(adapt(model, small_volume, QUICK, name="quick"))
    steps = [r for r in reports if isinstance(r, StepReport)]
    epochs = [r for r in reports if isinstance(r, EpochReport)]
    assert [r.step for r in steps] == [1, 2, 3, 4] and steps[-1].total_steps == 4
    assert [r.epoch for r in epochs] == [1, 2]
    assert all(np.isfinite(r.loss) and r.eta_s >= 0 for r in steps)
    assert steps[-1].eta_s == 0
    assert all(0.0 <= r.agreement <= 1.0 for r in epochs)
    done = reports[-1]
    assert isinstance(done, AdaptDone)
    assert done.best_epoch == int(np.argmax(done.scores)) + 1  # epoch chosen by perturbation consistency
    assert len(done.agreements) == len(done.scores) == 2 and done.score == done.scores[done.best_epoch - 1]
    # the default gate segments the whole scan with the source and the adapted model, reporting progress
    gate = [r for r in reports if isinstance(r, GateProgress)]
    assert gate and gate[-1].done == gate[-1].total and [r.done for r in gate] == sorted(r.done for r in gate)
    assert done.gate == "confidence" and 0.0 <= done.gate_source_score <= 1.0 and 0.0 <= done.gate_score <= 1.0
    assert done.accepted == (done.gate_score > done.gate_source_score + confidence_margin(done.gate_source_score))
    assert done.adapter.metadata["gate_margin"] == confidence_margin(done.gate_source_score)
    assert done.adapter.metadata["gate_score"] == round(done.gate_score, 5)
    source = segment(model, small_volume, device="cpu")
    assert done.gate_source_score == pytest.approx(mask_confidence(source.probability, source.mask))
    paper = run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "selection": "agreement"}))
    assert paper.best_epoch == int(np.argmax(paper.agreements)) + 1
    assert done.adapter.base_model_id == before == model.model_id
    assert done.adapter.metadata["slices"] == done.slice_indices and len(done.slice_indices) == 4
    assert small_volume.path.name not in json.dumps(done.adapter.metadata)  # shared files name no scan
    # The adapter changes the network (it learned something), the base stays as it was.
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(apply_adapter(model, done.adapter)(x), model.unet(x))


def test_only_adapter_and_bn_change(model, small_volume):
    done = run_adaptation(model, small_volume, QUICK)
    lora = {k: v for k, v in done.adapter.tensors.items() if k.endswith("lora_B")}
    assert any(torch.count_nonzero(v) for v in lora.values())  # B moved away from zero
    adapted = apply_adapter(model, done.adapter, merge=False)
    base_state = model.unet.state_dict()
    for name, tensor in adapted.state_dict().items():
        plain = name.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
        if name.split(".")[0] in ("up1", "up2", "up3", "out_path", "shortcut0", "shortcut1", "shortcut2"):
            assert torch.equal(tensor, base_state[plain]), name
        elif ".conv." in name:
            assert torch.equal(tensor, base_state[plain]), name  # frozen conv weights inside adapters


def test_cancel_stops_within_a_step_and_leaves_the_base_alone(model, small_volume):
    before = model.model_id
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    reports = list(adapt(model, small_volume, QUICK, should_stop=stop_after_two))
    assert isinstance(reports[-1], AdaptCancelled)
    assert reports[-1].step == 2
    assert sum(isinstance(r, StepReport) for r in reports) == 2
    assert not any(isinstance(r, AdaptDone) for r in reports)
    assert model.model_id == before


def test_cancel_during_the_gate_ends_without_a_result(model, small_volume):
    seen: list = []

    def stop_in_the_gate() -> bool:
        return any(isinstance(r, GateProgress) for r in seen)

    for report in adapt(model, small_volume, QUICK, should_stop=stop_in_the_gate):
        seen.append(report)
    assert isinstance(seen[-1], AdaptCancelled) and sum(isinstance(r, GateProgress) for r in seen) == 1
    assert not any(isinstance(r, AdaptDone) for r in seen)


def test_closing_the_generator_midway_leaves_the_base_alone(model, small_volume):
    before = model.model_id
    run = adapt(model, small_volume, QUICK)
    next(run)
    run.close()
    assert model.model_id == before


def test_seeded_runs_are_reproducible(model, small_volume):
    a = run_adaptation(model, small_volume, QUICK).adapter.tensors
    b = run_adaptation(model, small_volume, QUICK).adapter.tensors
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "seed": 1})).adapter.tensors
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_slice_selection_spreads_over_the_head_and_skips_empty_slices():
    stack = np.zeros((100, 16, 16), np.float32)
    stack[20:80, 4:12, 4:12] = 1.0
    picked = select_slices(stack, 10)
    assert len(picked) == 10 and picked == sorted(picked)
    assert all(20 <= i < 80 for i in picked)
    assert picked[0] < 30 and picked[-1] >= 70
    assert select_slices(stack, 500) == list(range(20, 80))


def test_given_slice_indices_are_used_and_checked(model, small_volume):
    config = AdaptConfig(**{**QUICK.__dict__, "slice_indices": [10, 12], "epochs": 1})
    assert run_adaptation(model, small_volume, config).slice_indices == [10, 12]
    with pytest.raises(InputError, match="outside"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "slice_indices": [10_000]}))


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("slices", 0), ("lr", -1.0), ("rank", 0), ("batch_size", 0), ("kind", "lora"), ("experts", 0)],
)
def test_bad_settings_are_refused(model, small_volume, field, value):
    with pytest.raises(InputError, match=f"--{field.replace('_', '-')}"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, field: value}))


def test_adabn_statistics_are_exact_over_all_target_slices(model):
    unet = model.copy().unet
    inject_convlora(unet)
    images = torch.rand(5, 1, 32, 32) * torch.linspace(0.5, 2.0, 5).view(5, 1, 1, 1)
    reestimate_bn(unet, images)
    name, first = encoder_batchnorms(unet)[0]
    assert name == "init_path.2.conv_path.0.0"
    with torch.no_grad():
        x = unet.init_path[1](unet.init_path[0](images))  # what the first encoder BN sees
    torch.testing.assert_close(first.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(first.running_var, x.var(dim=(0, 2, 3), unbiased=True))
    assert first.momentum == 0.1  # restored for training


def test_without_adabn_the_source_statistics_are_kept(model, small_volume):
    done = run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "adabn": False}))
    assert done.adapter.metadata["adabn"] is False
    source = dict(encoder_batchnorms(model.unet))
    for name, bn in encoder_batchnorms(model.copy().unet):
        torch.testing.assert_close(done.adapter.tensors[f"{name}.running_mean"], bn.running_mean)
        torch.testing.assert_close(done.adapter.tensors[f"{name}.running_var"], source[name].running_var)
    with_adabn = run_adaptation(model, small_volume, QUICK).adapter.tensors
    name = encoder_batchnorms(model.unet)[0][0]
    assert not torch.allclose(with_adabn[f"{name}.running_mean"], done.adapter.tensors[f"{name}.running_mean"])


MOE = AdaptConfig(**{**QUICK.__dict__, "kind": "moe", "experts": 4})


def test_moe_adaptation_trains_adapters_and_gates_and_records_its_kind(model, small_volume, monkeypatch):
    import napari_convlora.adapt as engine

    balance = []

    def recorded(unet):
        loss = real(unet)
        balance.append(loss.item())
        return loss

    real = engine.balance_loss
    monkeypatch.setattr(engine, "balance_loss", recorded)
    before = model.model_id
    done = run_adaptation(model, small_volume, MOE)
    assert len(balance) == 4 and min(balance) > 0  # one balance loss per training step
    meta = done.adapter.metadata
    assert meta["kind"] == "moe" and meta["experts"] == 4 and meta["balance_weight"] == engine.BALANCE_WEIGHT
    tensors = done.adapter.tensors
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if k.endswith("lora_B"))
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if k.endswith("gate_weight"))  # balance loss
    assert model.model_id == before
    adapted = apply_adapter(model, done.adapter)
    assert len(moe_layers(adapted)) == len(meta["layers"])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(adapted(x), model.unet(x))
        assert torch.equal(adapted(x), adapted(x))  # eval mode: no gate noise


def test_moe_runs_are_reproducible_gate_noise_included(model, small_volume):
    a = run_adaptation(model, small_volume, MOE).adapter.tensors
    b = run_adaptation(model, small_volume, MOE).adapter.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
