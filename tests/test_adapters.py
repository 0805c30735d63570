"""ConvLoRA and MoE adapters: no-ops at start, exact merge/unmerge, and adapter files that reproduce predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_convlora.adapters import (
    BN_TENSORS,
    Adapter,
    ConvLoRA,
    ConvLoRAMoE,
    apply_adapter,
    balance_loss,
    encoder_batchnorms,
    extract_adapter,
    inject_adapters,
    inject_convlora,
    load_adapter,
    lora_layers,
    moe_layers,
    new_metadata,
    save_adapter,
    set_trainable,
    smooth_load,
)
from napari_convlora.errors import InputError
from napari_convlora.model import build_model

from .conftest import make_model


def _trained(conv: ConvLoRA, seed: int = 0) -> ConvLoRA:
    with torch.no_grad():
        conv.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
    return conv


def test_convlora_shapes_and_no_op_at_start():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    lora = ConvLoRA(conv, rank=2, alpha=2)
    assert lora.lora_A.shape == (6, 24) and lora.lora_B.shape == (48, 6)
    assert torch.count_nonzero(lora.delta_weight()) == 0
    x = torch.rand(2, 8, 10, 10)
    assert torch.equal(lora(x), conv(x))


def test_merge_unmerge_are_exact_inverses():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    original = conv.weight.detach().clone()
    lora = _trained(ConvLoRA(conv, rank=2))
    x = torch.rand(2, 8, 10, 10)
    with torch.no_grad():
        unmerged = lora(x)
        lora.merge()
        assert lora.merged and not torch.equal(conv.weight, original)
        merged = lora(x)
        lora.unmerge()
    assert torch.equal(conv.weight, original)  # bit for bit, not W + dW - dW
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    lora.merge()
    lora.merge()  # idempotent: never W + 2 dW
    torch.testing.assert_close(conv.weight, original + lora.delta_weight().detach())


def test_injection_covers_every_encoder_conv_and_nothing_else():
    unet = build_model(16).unet
    names = inject_convlora(unet)
    encoder_convs = 1 + 6 + 3 * (1 + 6)  # init conv + 3 blocks x 2, then per stage a down conv + 3 blocks x 2
    assert len(names) == encoder_convs == len(lora_layers(unet))
    assert all(n.split(".")[0] in ("init_path", "down1", "down2", "down3") for n in names)
    assert not any(isinstance(m, ConvLoRA) for n, m in unet.named_modules() if n.startswith(("up", "out", "short")))
    with pytest.raises(ValueError, match="already"):
        inject_convlora(unet)


def test_trainable_parameters_match_the_paper():
    unet = build_model(16).unet
    inject_convlora(unet)
    set_trainable(unet)
    init_block = sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad and n.startswith("init_path"))
    assert init_block == 3954  # the paper's figure for the init block
    total = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert total == 57_938


def test_gradients_reach_only_adapters_and_encoder_bn():
    model = make_model(4)
    unet = model.unet
    inject_convlora(unet)
    trainable = {id(p) for p in set_trainable(unet)}
    unet.train()
    unet(torch.rand(2, 1, 32, 32)).mean().backward()
    for name, p in unet.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def _adapted(model, seed=1) -> Adapter:
    unet = model.copy().unet
    inject_convlora(unet)
    for _, layer in lora_layers(unet):
        _trained(layer, seed)
    with torch.no_grad():
        for name, m in unet.named_modules():
            if isinstance(m, nn.BatchNorm2d) and name.startswith("down"):
                m.running_mean.add_(0.1)
    return extract_adapter(unet, new_metadata(model, "test", 2, 2.0))


def test_saved_adapter_reproduces_predictions_in_a_fresh_model(tmp_path):
    model = make_model(4)
    adapter = _adapted(model)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = apply_adapter(model, adapter, merge=False)(x)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    fresh = make_model(4)  # same seed, same weights, new objects
    loaded = load_adapter(path)
    with torch.no_grad():
        assert torch.equal(apply_adapter(fresh, loaded, merge=False)(x), expected)
        torch.testing.assert_close(apply_adapter(fresh, loaded, merge=True)(x), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(fresh.unet(x), expected)  # the adapter does change the output
    assert fresh.model_id == model.model_id  # applying never touches the base


def test_adapter_holds_only_adapter_tensors_and_encoder_bn_state():
    model = make_model(4)
    adapter = _adapted(model)
    bns = [n for n, _ in encoder_batchnorms(model.unet)]
    expected = {f"{n}.{t}" for n in adapter.metadata["layers"] for t in ("lora_A", "lora_B")}
    expected |= {f"{n}.{t}" for n in bns for t in BN_TENSORS}
    assert set(adapter.tensors) == expected
    assert all(n.split(".")[0] in ("init_path", "down1", "down2", "down3") for n in bns)
    n_base = sum(t.numel() for t in model.state_dict().values())
    assert sum(t.numel() for t in adapter.tensors.values()) < 0.2 * n_base


def test_refuses_an_adapter_for_another_base_model():
    adapter = _adapted(make_model(4, seed=0))
    other = make_model(4, seed=5)
    with pytest.raises(InputError, match="adapter made for base model"):
        apply_adapter(other, adapter)


def test_saving_never_replaces_an_existing_adapter_unless_asked(tmp_path):
    adapter = _adapted(make_model(4))
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"someone else's file")
    with pytest.raises(InputError, match="already exists"):
        save_adapter(adapter, target)
    assert target.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left behind
    save_adapter(adapter, target, overwrite=True)
    assert load_adapter(target).tensors.keys() == adapter.tensors.keys()


# ---------------------------------------------------------------- MoE (Conv-LoRA with scale experts)


def _trained_moe(layer: ConvLoRAMoE, seed: int = 0) -> ConvLoRAMoE:
    """Non-zero B and gate, as training would leave them, so every part of the layer shows in its output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.normal_(generator=generator)
        layer.gate_weight.normal_(std=3.0, generator=generator)
        layer.experts_bias.normal_(std=0.1, generator=generator)
    return layer


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 2, stride=2, bias=False)])
def test_moe_layer_shapes_and_exact_no_op_at_start(conv):
    layer = ConvLoRAMoE(conv, rank=2, alpha=2.0, experts=8)
    k = conv.kernel_size[0]
    assert layer.lora_A.shape == (2, 8, k, k) and layer.lora_B.shape == (16, 2, 1, 1)
    assert layer.experts_weight.shape == (16, 2, 3, 3) and layer.experts_bias.shape == (16,)
    assert layer.gate_weight.shape == layer.noise_weight.shape == (8, 2)
    assert not layer.gate_weight.any() and not layer.noise_weight.any() and not layer.lora_B.any()
    x = torch.rand(3, 8, 16, 16)
    for training in (False, True):
        layer.train(training)
        assert torch.equal(layer(x), conv(x))


def test_moe_unet_is_bit_exact_with_the_unadapted_unet_at_start():
    model = make_model(4)
    unet = model.copy().unet
    names = inject_adapters(unet, "moe", experts=8)
    assert names == [n for n, m in model.unet.encoder_modules() if isinstance(m, nn.Conv2d)]
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = model.unet(x)
        assert torch.equal(unet.eval()(x), expected)
        for _, layer in moe_layers(unet):  # noisy routing in training picks other experts: still exact
            layer.train()
        assert torch.equal(unet(x), expected)


def test_moe_routes_each_sample_through_one_expert_independently_of_the_batch():
    layer = _trained_moe(ConvLoRAMoE(nn.Conv2d(4, 4, 3, padding=1), rank=2, experts=4)).eval()
    x = torch.rand(6, 4, 12, 12) + torch.randn(6, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = F.conv2d(x, layer.lora_A, None, 1, 1)
        chosen = layer._route(a)
        assert len(chosen.unique()) > 1  # the batch really is split between experts
        batch = layer(x)
        one_by_one = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(batch, one_by_one, rtol=1e-5, atol=1e-6)
        # expert i sees the bottleneck i times upsampled: the chosen expert of each sample is what ran
        for i, expert in enumerate(chosen.tolist()):
            mixed = a[i : i + 1] + layer._expert(a[i : i + 1], expert)
            want = layer.conv(x[i : i + 1]) + F.conv2d(mixed, layer.lora_B) * layer.scaling
            torch.testing.assert_close(batch[i : i + 1], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer(x), batch)  # eval mode is deterministic


@pytest.mark.parametrize("size", [(7, 9), (12, 12)])
def test_moe_experts_equal_upsample_conv_gelu_pool_done_literally(size):
    """Each expert, computed on the original grid, equals nearest upsampling, conv + GELU, average pooling."""
    layer = ConvLoRAMoE(nn.Conv2d(3, 3, 3, padding=1), rank=3, experts=8)
    with torch.no_grad():
        layer.experts_bias.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    a = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for i in range(8):
        s = i + 1
        weight, bias = layer.experts_weight[3 * i : 3 * i + 3], layer.experts_bias[3 * i : 3 * i + 3]
        fine = F.interpolate(a, scale_factor=s, mode="nearest")
        literal = F.avg_pool2d(F.gelu(F.conv2d(fine, weight, bias, padding=1)), s)
        torch.testing.assert_close(layer._expert(a, i), literal, rtol=1e-5, atol=1e-6)


def test_moe_expert_scales_are_different_functions():
    layer = ConvLoRAMoE(nn.Conv2d(2, 2, 3, padding=1), rank=2, experts=3)
    with torch.no_grad():
        layer.experts_weight.copy_(layer.experts_weight[:2].repeat(3, 1, 1, 1))  # same conv for every expert
    a = torch.rand(1, 2, 8, 8)
    outputs = [layer._expert(a, i) for i in range(3)]
    assert all(o.shape == a.shape for o in outputs)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_moe_balance_loss_is_positive_in_training_and_trains_the_gate():
    unet = make_model(4).copy().unet
    inject_adapters(unet, "moe", experts=8)
    x = torch.rand(2, 1, 32, 32)
    unet.eval()
    unet(x)
    assert all(layer.balance_loss is None for _, layer in moe_layers(unet))
    with pytest.raises(ValueError, match="training mode"):
        balance_loss(unet)
    for _, layer in moe_layers(unet):
        layer.train()
    unet(x)
    loss = balance_loss(unet)
    assert loss.item() > 0 and all(layer.balance_loss.item() > 0 for _, layer in moe_layers(unet))
    loss.backward()
    _, first = moe_layers(unet)[0]
    assert first.gate_weight.grad.abs().sum() > 0 and first.noise_weight.grad.abs().sum() > 0


def testsmooth_load_is_the_probability_of_winning_under_fresh_noise():
    """Shazeer's load: P(expert i wins) when only its own noise is drawn again; checked by Monte Carlo."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, generator=generator)
    noise_std = torch.rand(3, 5, generator=generator) + 0.2
    noisy = clean + torch.randn(3, 5, generator=generator) * noise_std
    draws = clean[None] + torch.randn(20_000, 3, 5, generator=generator) * noise_std[None]
    wins = torch.zeros(3, 5)
    for i in range(5):
        others = torch.cat([noisy[:, :i], noisy[:, i + 1 :]], dim=1).max(dim=1).values
        wins[:, i] = (draws[:, :, i] > others[None]).float().mean(dim=0)
    torch.testing.assert_close(smooth_load(clean, noisy, noise_std), wins.sum(dim=0), rtol=0, atol=0.03)


def test_moe_with_one_expert_has_no_balance_to_keep():
    layer = ConvLoRAMoE(nn.Conv2d(4, 4, 3, padding=1), experts=1).train()
    layer(torch.rand(3, 4, 8, 8))
    assert layer.balance_loss.item() == 0


def test_moe_training_noise_is_seeded():
    def routes(seed: int) -> list[int]:
        unet = make_model(4).copy().unet
        inject_adapters(unet, "moe", experts=8, seed=seed)
        layer = moe_layers(unet)[0][1].train()
        return [layer._route(torch.rand(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))).tolist()
                for _ in range(3)]  # fmt: skip

    assert routes(0) == routes(0) and routes(0) != routes(1)


def test_moe_gradients_reach_only_adapters_and_encoder_bn():
    unet = make_model(4).unet
    inject_adapters(unet, "moe")
    trainable = set_trainable(unet)
    expected = [getattr(m, t) for _, m in moe_layers(unet) for t in ConvLoRAMoE.TENSORS]
    expected += [p for _, bn in encoder_batchnorms(unet) for p in (bn.weight, bn.bias)]
    assert {id(p) for p in trainable} == {id(p) for p in expected}
    unet.train()
    (unet(torch.rand(2, 1, 32, 32)).mean() + balance_loss(unet)).backward()
    ids = {id(p) for p in trainable}
    for name, p in unet.named_parameters():
        if id(p) in ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_moe_trainable_parameters_are_counted_in_the_adapter():
    model = build_model(8)
    unet = model.copy().unet
    inject_adapters(unet, "moe", rank=2, experts=8)
    trainable = sum(p.numel() for p in set_trainable(unet))
    adapter = extract_adapter(unet, new_metadata(model, "m", 2, 2.0, kind="moe", experts=8))
    assert adapter.trainable_parameters == trainable == 26_066  # the 8-wide model of the benchmark
    per_layer = {n: sum(getattr(m, t).numel() for t in m.TENSORS) for n, m in moe_layers(unet)}
    # A: r x C_in x 3 x 3, B: C_out x r, experts 8 x (r x r x 3 x 3 + r), gate and noise 2 x 8 x r
    assert per_layer["init_path.0"] == 2 * 1 * 9 + 8 * 2 + 8 * (2 * 2 * 9 + 2) + 2 * 8 * 2


def _moe_adapted(model, seed=1) -> Adapter:
    unet = model.copy().unet
    inject_adapters(unet, "moe", experts=4)
    for i, (_, layer) in enumerate(moe_layers(unet)):
        _trained_moe(layer, seed + i)
    with torch.no_grad():
        for name, m in unet.named_modules():
            if isinstance(m, nn.BatchNorm2d) and name.startswith("down"):
                m.running_mean.add_(0.1)
    return extract_adapter(unet, new_metadata(model, "moe-test", 2, 2.0, kind="moe", experts=4))


def test_saved_moe_adapter_reproduces_predictions_in_a_fresh_model(tmp_path):
    model = make_model(4)
    adapter = _moe_adapted(model)
    assert adapter.metadata["kind"] == "moe" and adapter.metadata["experts"] == 4
    x = torch.rand(3, 1, 32, 32) * torch.linspace(0.2, 2.0, 3).view(3, 1, 1, 1)
    with torch.no_grad():
        expected = apply_adapter(model, adapter, merge=False)(x)
    path = save_adapter(adapter, tmp_path / "moe.safetensors")
    fresh = make_model(4)
    loaded = load_adapter(path)
    assert loaded.metadata["kind"] == "moe" and loaded.metadata["experts"] == 4
    with torch.no_grad():
        assert torch.equal(apply_adapter(fresh, loaded, merge=False)(x), expected)
        merged = apply_adapter(fresh, loaded, merge=True)  # nothing of a MoE layer can be merged
        assert moe_layers(merged) and torch.equal(merged(x), expected)
        assert not torch.allclose(fresh.unet(x), expected)
    assert fresh.model_id == model.model_id
