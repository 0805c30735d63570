"""ConvLoRA: a no-op at start, exact merge/unmerge, and adapter files that reproduce predictions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_convlora.adapters import (
    BN_TENSORS,
    Adapter,
    ConvLoRA,
    apply_adapter,
    encoder_batchnorms,
    extract_adapter,
    inject_convlora,
    load_adapter,
    lora_layers,
    new_metadata,
    save_adapter,
    set_trainable,
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
