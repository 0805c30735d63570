"""The label-free objectives, the consistency score and the do-no-harm gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_convlora.adapt import AdaptConfig, EpochReport, adapt, reestimate_bn, run_adaptation
from napari_convlora.adapters import apply_adapter, inject_convlora, set_trainable
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan, select_slices
from napari_convlora.library import default_model_path
from napari_convlora.model import load_model
from napari_convlora.objectives import (
    OBJECTIVES,
    PRIOR_OBJECTIVES,
    REFERENCE_OBJECTIVES,
    SourceStatistics,
    multiview_probability,
    pseudo_label_loss,
    pseudo_labels,
    warp,
)
from napari_convlora.scanner_reference import METADATA_KEY as REFERENCE_KEY
from napari_convlora.scanner_reference import feature_moments, learn_reference
from napari_convlora.selection import (
    DEFAULT_GATE,
    GATE_MARGINS,
    SURE_SOURCE_CONFIDENCE,
    SURE_SOURCE_MARGIN,
    accepted,
    accepted_by_confidence,
    confidence_margin,
    consistency,
    mask_confidence,
    perturbations,
)
from napari_convlora.shape_prior import METADATA_KEY as PRIOR_KEY
from napari_convlora.shape_prior import learn_shape_prior
from napari_convlora.training import load_heads

from .conftest import SAMPLE_MASK, SAMPLE_T1

QUICK = AdaptConfig(
    objective="early-head", slices=4, epochs=2, batch_size=2, lr=1e-3, seed=0, device="cpu", adabn=False
)


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o not in ("early-head", "intensity")])  # no adapters
def test_a_few_steps_move_the_adapters(model, small_volume, objective):
    if objective in PRIOR_OBJECTIVES:  # a prior from the sample's own mask (the random model has none)
        model = model.copy()
        mask = load_heads([(SAMPLE_T1, SAMPLE_MASK)])[0].masks
        model.metadata[PRIOR_KEY] = learn_shape_prior([mask]).as_metadata()
    if objective in REFERENCE_OBJECTIVES:  # a reference the sample is far from: its slices, half as bright
        model = model.copy()
        geometry, scaled = plan(small_volume, model.intensity_scaling)
        stack = geometry.to_model(scaled)
        images = torch.from_numpy(stack[select_slices(stack, 4)][:, None].copy()) * 0.5
        moments = [feature_moments(model.unet, images), feature_moments(model.unet, images * 1.1)]
        model.metadata[REFERENCE_KEY] = learn_reference(moments, ["a", "b"]).as_metadata()
    done = run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "objective": objective}))
    lora_b = [v for k, v in done.adapter.tensors.items() if k.endswith("lora_B")]
    assert lora_b and any(torch.count_nonzero(v) for v in lora_b)
    assert done.adapter.metadata["objective"] == objective
    assert len(done.scores) == 2 and 0.0 <= done.source_score <= 1.0


def test_zero_initialised_adapters_are_a_no_op_for_every_loss(model):
    """Before any step the adapted network is the source network: statistics loss and outputs are the source's."""
    images = torch.rand(4, 1, 32, 32)
    unet = model.copy().unet.eval()
    with torch.no_grad():
        before = unet(images)
    inject_convlora(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(images), before)
    stats = SourceStatistics(unet)
    with stats.measuring(), torch.no_grad():
        unet.encode(images)
    assert torch.isfinite(stats.loss())


def test_feature_statistics_loss_is_zero_on_the_source_statistics(model):
    """Set the BN running statistics to the batch's own: the loss is (numerically) zero; shift the input: it is not."""
    unet = model.copy().unet
    images = torch.rand(6, 1, 32, 32)
    reestimate_bn(unet, images)
    stats = SourceStatistics(unet)
    with stats.measuring(), torch.no_grad():
        unet.encode(images)
    matched = float(stats.loss())
    assert matched < 0.02  # the running std is the unbiased one: a hair from the batch's
    with stats.measuring(), torch.no_grad():
        unet.encode(images * 3 + 1)
    assert float(stats.loss()) > 10 * max(matched, 0.01)


def test_feature_statistics_training_lowers_its_loss(model, small_volume):
    config = AdaptConfig(**{**QUICK.__dict__, "objective": "feature-stats", "epochs": 6, "lr": 3e-3})
    losses = [r.loss for r in adapt(model, small_volume, config) if isinstance(r, EpochReport)]
    assert losses[-1] < losses[0]


def test_pseudo_labels_keep_the_largest_component_and_mark_confidence():
    p = torch.full((1, 1, 20, 20), 0.02)
    p[0, 0, 2:12, 2:12] = 0.97  # the brain
    p[0, 0, 15:18, 15:18] = 0.95  # a blob (a leak): confident, but not brain
    p[0, 0, 0, :] = 0.6  # unsure
    labels, weights = pseudo_labels(p)
    assert labels[0, 0, 5, 5] == 1 and labels[0, 0, 16, 16] == 0 and labels.sum() == 100
    assert weights[0, 0, 16, 16] == 1 and weights[0, 0, 0, 5] == 0 and weights[0, 0, 5, 5] == 1


def test_multiview_probability_maps_every_view_back_to_the_slice(model):
    """A model that returns its input: every view mapped back gives the input again (away from the border)."""

    class Identity(torch.nn.Module):
        def forward(self, x):
            return torch.logit(x.clamp(1e-4, 1 - 1e-4))

    images = torch.zeros(1, 1, 64, 64)
    images[0, 0, 24:40, 20:44] = 0.9
    mean = multiview_probability(Identity(), images, batch_size=1)
    inside = (slice(None), slice(None), slice(28, 36), slice(26, 38))
    assert float((mean[inside] - images[inside]).abs().max()) < 0.15  # gamma views shift 0.9 a little
    assert float(mean[..., :8, :8].max()) < 0.01
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(warp(images, theta), images, atol=1e-5, rtol=0)


def test_pseudo_label_loss_has_gradients_only_into_the_adapters(model):
    unet = model.copy().unet
    inject_convlora(unet)
    trainable = set_trainable(unet)
    x = torch.rand(2, 1, 32, 32)
    labels = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss = pseudo_label_loss(unet, x, labels, torch.ones_like(labels), torch.Generator().manual_seed(0))
    loss.backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for p in trainable)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_perturbations_are_fixed_and_consistency_is_in_range(model):
    images = torch.rand(3, 1, 32, 32)
    a, b = perturbations(images), perturbations(images)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == 3
    score = consistency(model.unet, images, 2)
    assert 0.0 <= score <= 1.0


def test_an_empty_mask_is_not_perfectly_consistent(model):
    """A collapsed model (every logit negative) scores 0: collapse must never pass the gate."""
    unet = model.copy().unet
    with torch.no_grad():
        unet.out_path[-1].bias.fill_(-1e3)  # the final BatchNorm's shift
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert not (unet(images) > 0).any()
    assert consistency(unet, images, 2) == 0.0


def test_gate_rule():
    assert accepted(0.90, 0.85, 0.005) and not accepted(0.853, 0.85, 0.005) and not accepted(0.80, 0.85, 0.005)


def test_the_confidence_gate_asks_more_of_a_sure_source_model():
    """Below SURE_SOURCE_CONFIDENCE any gain in confidence passes; from it on, only a gain over SURE_SOURCE_MARGIN."""
    unsure, sure = SURE_SOURCE_CONFIDENCE - 0.02, SURE_SOURCE_CONFIDENCE + 0.03
    assert confidence_margin(unsure) == GATE_MARGINS["confidence"] and confidence_margin(sure) == SURE_SOURCE_MARGIN
    assert accepted_by_confidence(unsure + 0.005, unsure) and not accepted_by_confidence(unsure, unsure)
    assert not accepted_by_confidence(sure + SURE_SOURCE_MARGIN / 2, sure)
    assert accepted_by_confidence(sure + 2 * SURE_SOURCE_MARGIN, sure)
    assert not accepted_by_confidence(sure - 0.01, sure)


@pytest.fixture(scope="module")
def shipped():
    return load_model(default_model_path())


HARMFUL = dict(objective="early-head", slices=6, epochs=3, batch_size=2, lr=0.5, seed=0, device="cpu", adabn=False)


@pytest.mark.parametrize("gate", ["confidence", "consistency"])
def test_the_gate_refuses_a_harmful_adapter(shipped, small_volume, gate):
    """Adapting at lr 0.5 wrecks the shipped model on a real head: the gate's score falls and the gate says no."""
    done = run_adaptation(shipped, small_volume, AdaptConfig(**HARMFUL, gate=gate))
    assert done.gate == gate and done.gate_score < done.gate_source_score and not done.accepted
    if gate == "consistency":
        assert (done.gate_score, done.gate_source_score) == (done.score, done.source_score)
    meta = done.adapter.metadata
    margin = confidence_margin(done.gate_source_score) if gate == "confidence" else GATE_MARGINS[gate]
    assert meta["accepted"] is False and meta["gate"] == gate and meta["gate_margin"] == margin
    harmed = apply_adapter(shipped, done.adapter)
    assert consistency(harmed, torch.rand(2, 1, 64, 64)) >= 0.0  # the adapter still loads and runs


def test_mask_confidence_is_how_sure_the_mask_is():
    sure = np.zeros((4, 6, 6), np.float32)
    sure[1:3, 1:5, 1:5] = 1.0
    mask = (sure > 0.5).astype(np.uint8)
    assert mask_confidence(sure, mask) == 1.0
    unsure = np.where(sure > 0, 0.75, 0.0).astype(np.float32)
    assert mask_confidence(unsure, mask) == pytest.approx(0.5)
    island = sure.copy()
    island[0, 0, 0] = 0.55  # an unsure island the clean-up removed still counts against the model
    assert mask_confidence(island, mask) < 1.0
    assert mask_confidence(np.zeros_like(sure), np.zeros_like(mask)) == 0.0  # a lost brain is not a sure one


def test_cli_writes_no_rejected_adapter_unless_asked(shipped, small_path, tmp_path, capsys):
    out = tmp_path / "bad.safetensors"
    args = ["adapt", str(small_path), "-o", str(out), "--device", "cpu", "--slices", "6", "--epochs", "3",
            "--lr", "0.5", "--no-adabn", "--objective", "early-head", "--json"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["accepted"] is False and result["adapter"] is None and not out.exists()
    assert "adaptation did not help on this scan; keeping the source model" in captured.err
    assert main([*args, "--keep-rejected"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] == str(out) and out.is_file()


def test_bad_objective_and_selection_are_refused(model, small_volume):
    with pytest.raises(InputError, match="--objective"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "objective": "magic"}))
    with pytest.raises(InputError, match="--selection"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "selection": "luck"}))
    with pytest.raises(InputError, match="--gate"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "gate": "luck"}))
    with pytest.raises(InputError, match=r"carries no scanner reference.*--objective scanner-reference"):
        run_adaptation(model, small_volume, AdaptConfig(**{**QUICK.__dict__, "objective": "scanner-reference"}))
    assert QUICK.gate == DEFAULT_GATE == "confidence" and QUICK.margin == GATE_MARGINS["confidence"]
    assert AdaptConfig(gate="consistency", gate_margin=0.02).margin == 0.02
