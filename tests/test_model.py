"""The U-Net and early head: sizes from the paper, and weight files that refuse what they should."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from napari_convlora.errors import InputError
from napari_convlora.model import build_model, count_parameters, fold_batch_norms, load_model, save_model

from .conftest import make_model


def test_parameter_count_matches_the_paper():
    model = build_model(16)
    n = count_parameters(model.unet)
    assert n == 2_451_091
    assert abs(n - 2.43e6) / 2.43e6 < 0.01
    assert count_parameters(model.head) == 14_821


def test_shapes_of_network_and_early_head():
    model = make_model(8)
    x = torch.rand(2, 1, 48, 64)
    with torch.no_grad():
        features = model.unet.encode(x)
        assert features[-1].shape == (2, 64, 6, 8)  # 1/8 resolution, 8w channels
        assert model.unet(x).shape == (2, 1, 48, 64)
        assert model.head(features[-1], (48, 64)).shape == (2, 1, 48, 64)


def test_save_load_roundtrip_keeps_id_and_predictions(tmp_path):
    model = make_model(4, seed=3)
    model_id = save_model(model, tmp_path / "m.safetensors", training={"command": "test"})
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.model_id == model_id == model.model_id
    assert loaded.metadata["training"] == {"command": "test"}
    assert loaded.metadata["architecture"]["base_width"] == 4
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x), model.unet(x))


def test_intensity_scaling_is_recorded_and_older_files_read_as_percentile(tmp_path):
    model = make_model(4, seed=3)
    assert model.intensity_scaling == "tissue"  # what new models train with
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").intensity_scaling == "tissue"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "convlora-model", "format_version": 1, "architecture": model.metadata["architecture"]}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"convlora": json.dumps(meta)})
    assert load_model(tmp_path / "old.safetensors").intensity_scaling == "percentile"
    meta["intensity_scaling"] = "z-score"
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={"convlora": json.dumps(meta)})
    with pytest.raises(InputError, match=r"odd\.safetensors: unknown intensity scaling 'z-score'"):
        load_model(tmp_path / "odd.safetensors")


def test_model_id_depends_on_weights_only():
    a, b = make_model(4, seed=0), make_model(4, seed=0)
    b.metadata["training"] = {"anything": 1}
    assert a.model_id == b.model_id
    with torch.no_grad():
        b.unet.init_path[0].weight[0, 0, 0, 0] += 1e-6
    assert a.model_id != b.model_id


def test_refuses_pickles_garbage_and_foreign_tensors(tmp_path):
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(InputError, match="not a safetensors file"):
        load_model(pickled)
    torch_file = tmp_path / "model.pt"
    torch.save(make_model(4).unet.state_dict(), torch_file)
    with pytest.raises(InputError, match="not a safetensors file"):
        load_model(torch_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="metadata"):
        load_model(plain)
    wrong = tmp_path / "wrong.safetensors"
    meta = {"format": "convlora-model", "format_version": 1, "architecture": {"name": "UNet2D", "base_width": 4}}
    save_file({"unet.init_path.0.weight": torch.zeros(4, 1, 3, 3)}, str(wrong), metadata={"convlora": json.dumps(meta)})
    with pytest.raises(InputError, match="do not match the architecture"):
        load_model(wrong)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(1)}, str(newer), metadata={"convlora": json.dumps({**meta, "format_version": 99})})
    with pytest.raises(InputError, match="newer"):
        load_model(newer)


def test_folded_batch_norms_compute_the_same_function():
    """Inference folds each conv-then-BN pair of its own copy; the function must not change."""
    torch.manual_seed(0)
    unet = build_model(4).unet
    with torch.no_grad():  # BN statistics and affine far from the identity, so a wrong fold shows
        for m in unet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    unet.eval()
    folded = fold_batch_norms(copy.deepcopy(unet))
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert count(folded) == count(unet) - 25
    x = torch.rand(2, 1, 32, 40)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), unet(x), rtol=1e-4, atol=1e-4)
