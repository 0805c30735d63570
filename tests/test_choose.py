"""Automatic adapter choice without labels: feature-statistics fit (default) and early/final agreement."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from napari_convlora import choose
from napari_convlora.adapt import AdaptConfig, agreement, reestimate_bn, run_adaptation
from napari_convlora.adapters import apply_adapter, save_adapter
from napari_convlora.choose import SOURCE, choose_adapter, statistics_fit
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan, select_slices
from napari_convlora.selection import GATE_MARGIN, consistency

from .conftest import drive, make_model


def _images(volume, n, scaling="tissue"):
    geometry, scaled = plan(volume, scaling)
    stack = geometry.to_model(scaled)
    return geometry, torch.from_numpy(stack[select_slices(stack, n)][:, None].copy())


@pytest.fixture(scope="module")
def inverted(small_volume):
    """The same head with inverted contrast: a scanner as different as it gets."""
    return replace(small_volume, data=small_volume.data.max() - small_volume.data)


def test_statistics_fit_is_one_on_the_statistics_it_stores_and_lower_elsewhere(small_volume, inverted):
    torch.set_num_threads(1)
    unet = make_model().unet
    _, images = _images(small_volume, 4)
    reestimate_bn(unet, images)
    assert statistics_fit(unet, images) == pytest.approx(1.0, abs=1e-5)
    _, other = _images(inverted, 4)
    assert statistics_fit(unet, other) < 0.9


def test_stats_pick_the_adapter_of_the_scans_own_scanner(tmp_path, small_volume, inverted):
    torch.set_num_threads(1)
    base = make_model()
    config = AdaptConfig(objective="early-head", slices=4, epochs=1, device="cpu")
    plain = save_adapter(run_adaptation(base, small_volume, config, "a").adapter, tmp_path / "plain.safetensors")
    flipped = save_adapter(run_adaptation(base, inverted, config, "b").adapter, tmp_path / "flipped.safetensors")
    # named by file (the library name), not by the name inside the file
    for volume, expected in ((small_volume, "plain"), (inverted, "flipped")):
        choice = choose_adapter(base, volume, [plain, flipped], device="cpu", slices=4)
        assert set(choice.scores) == {SOURCE, "plain", "flipped"}
        assert choice.label == expected and choice.adapter is not None
        assert choice.reason.startswith(f"auto chose {expected}") and "no labels" in choice.reason
        assert "KL to each candidate's BN statistics" in choice.reason  # the model carries no scanner reference


def test_agreement_criterion_scores_every_candidate_and_skips_foreign_ones(tmp_path, small_volume):
    torch.set_num_threads(1)
    base = make_model()
    adapted = run_adaptation(
        base, small_volume, AdaptConfig(objective="early-head", slices=3, epochs=2, lr=1e-2, device="cpu"), name="mine"
    )
    mine = save_adapter(adapted.adapter, tmp_path / "mine.safetensors")
    foreign = run_adaptation(
        make_model(seed=1), small_volume, AdaptConfig(objective="early-head", slices=1, epochs=1, device="cpu"), "other"
    )
    other = save_adapter(foreign.adapter, tmp_path / "other.safetensors")

    choice = choose_adapter(base, small_volume, [mine, other, mine], device="cpu", slices=4, criterion="agreement")

    assert set(choice.scores) == {SOURCE, "mine"} and set(choice.skipped) == {"other"}
    assert choice.label == max(choice.scores, key=choice.scores.get)
    assert (choice.adapter is None) == (choice.label == SOURCE)
    # the scores are the adaptation engine's own agreement figure on the same slices
    geometry, images = _images(small_volume, 4)
    expected = agreement(apply_adapter(base, adapted.adapter), base.copy().head.eval(), images, geometry, 4)
    assert abs(choice.scores["mine"] - expected) < 1e-9
    assert "agreement" in choice.reason and "skipped other" in choice.reason


def test_choice_with_an_empty_library_is_the_source_model(small_volume):
    choice = choose_adapter(make_model(), small_volume, [], device="cpu", slices=2)
    assert choice.label == SOURCE and choice.adapter is None and list(choice.scores) == [SOURCE]


def test_unknown_criterion_is_refused(small_volume):
    with pytest.raises(InputError, match="unknown criterion 'best'"):
        choose_adapter(make_model(), small_volume, [], device="cpu", criterion="best")


def test_consistency_criterion_is_the_gates_score_and_the_source_keeps_the_margin(tmp_path, small_volume, monkeypatch):
    torch.set_num_threads(1)
    base = make_model()
    adapted = run_adaptation(
        base, small_volume, AdaptConfig(objective="early-head", slices=3, epochs=2, lr=1e-2, device="cpu"), name="mine"
    )
    mine = save_adapter(adapted.adapter, tmp_path / "mine.safetensors")
    choice = choose_adapter(base, small_volume, [mine], device="cpu", slices=4, criterion="consistency")
    _, images = _images(small_volume, 4)
    assert choice.scores["mine"] == pytest.approx(consistency(apply_adapter(base, adapted.adapter), images, 4))
    assert choice.scores[SOURCE] == pytest.approx(consistency(base.copy().unet, images, 4))
    wins = choice.scores["mine"] > choice.scores[SOURCE] + GATE_MARGIN
    assert choice.label == ("mine" if wins else SOURCE)
    # an adapter that is better, but by less than the margin, does not displace the source model
    fake = {"n": 0}

    def scored(unet, images, batch_size=4):
        fake["n"] += 1
        return 0.80 if fake["n"] == 1 else 0.80 + GATE_MARGIN / 2

    monkeypatch.setattr(choose, "consistency", scored)
    assert choose_adapter(base, small_volume, [mine], device="cpu", slices=4, criterion="consistency").label == SOURCE


@pytest.mark.parametrize("adapter_sure", [True, False])
def test_a_pick_is_kept_only_if_its_mask_is_more_confident(monkeypatch, small_volume, adapter_sure):
    torch.set_num_threads(1)
    base = make_model()
    adapted = run_adaptation(
        base, small_volume, AdaptConfig(objective="early-head", slices=3, epochs=1, device="cpu"), name="mine"
    )
    choice = choose.AutoChoice(adapted.adapter, "mine", {SOURCE: 0.5, "mine": 0.9}, criterion="stats")
    calls = []

    def confidence(probability, mask):  # the adapter's mask is scored first, then the source model's
        calls.append(probability)
        return 0.9 if (len(calls) == 1) == adapter_sure else 0.8

    monkeypatch.setattr(choose, "mask_confidence", confidence)
    reports, checked = drive(choose.iter_segment_checked(base, small_volume, choice, device="cpu"))
    assert [r.done for r in reports] == sorted(r.done for r in reports) and reports[-1].done == reports[-1].total
    if adapter_sure:
        assert checked.label == "mine" and checked.segmentation.adapter == "mine" and "check passed" in checked.note
    else:
        assert (
            checked.label == SOURCE and checked.segmentation.adapter == "none" and "source model kept" in checked.note
        )


def test_a_source_pick_is_segmented_once_and_a_stop_returns_nothing(small_volume):
    torch.set_num_threads(1)
    base = make_model()
    choice = choose.AutoChoice(None, SOURCE, {SOURCE: 1.0}, criterion="stats")
    reports, checked = drive(choose.iter_segment_checked(base, small_volume, choice, device="cpu"))
    plain = [r for r in choose.iter_segment(base, small_volume, None, device="cpu") if hasattr(r, "total")]
    assert reports[-1].total == plain[-1].total  # one segmentation, no check needed
    assert checked.label == SOURCE and checked.note == choice.reason
    stopped = drive(choose.iter_segment_checked(base, small_volume, choice, device="cpu", should_stop=lambda: True))
    assert stopped[1] is None
