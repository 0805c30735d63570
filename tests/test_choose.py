"""Automatic adapter choice by the label-free agreement of the early head and the final mask."""

from __future__ import annotations

import torch

from napari_convlora.adapt import AdaptConfig, agreement, run_adaptation, select_slices
from napari_convlora.adapters import apply_adapter, save_adapter
from napari_convlora.choose import SOURCE, choose_adapter
from napari_convlora.geometry import plan

from .conftest import make_model


def test_choice_scores_every_candidate_and_takes_the_best(tmp_path, small_volume):
    torch.set_num_threads(1)
    base = make_model()
    adapted = run_adaptation(base, small_volume, AdaptConfig(slices=3, epochs=2, lr=1e-2, device="cpu"), name="mine")
    mine = save_adapter(adapted.adapter, tmp_path / "mine.safetensors")
    foreign = run_adaptation(make_model(seed=1), small_volume, AdaptConfig(slices=1, epochs=1, device="cpu"), "other")
    other = save_adapter(foreign.adapter, tmp_path / "other.safetensors")

    choice = choose_adapter(base, small_volume, [mine, other], device="cpu", slices=4)

    assert set(choice.scores) == {SOURCE, "mine"} and set(choice.skipped) == {"other"}
    assert choice.label == max(choice.scores, key=choice.scores.get)
    assert (choice.adapter is None) == (choice.label == SOURCE)
    # the scores are the adaptation engine's own agreement figure on the same slices
    geometry, scaled = plan(small_volume)
    stack = geometry.to_model(scaled)
    images = torch.from_numpy(stack[select_slices(stack, 4)][:, None].copy())
    expected = agreement(apply_adapter(base, adapted.adapter), base.copy().head.eval(), images, geometry, 4)
    assert abs(choice.scores["mine"] - expected) < 1e-9
    assert choice.reason.startswith(f"auto chose {choice.label}") and "no labels" in choice.reason
    assert "skipped other" in choice.reason


def test_choice_with_an_empty_library_is_the_source_model(small_volume):
    choice = choose_adapter(make_model(), small_volume, [], device="cpu", slices=2)
    assert choice.label == SOURCE and choice.adapter is None and list(choice.scores) == [SOURCE]
