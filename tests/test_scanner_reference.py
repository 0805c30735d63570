"""Scanner references over several heads: the distance, the file metadata, and `--adapter auto` with them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_convlora.adapt import AdaptConfig, run_adaptation
from napari_convlora.adapters import apply_adapter, load_adapter, save_adapter
from napari_convlora.choose import SOURCE, choose_adapter
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan, select_slices
from napari_convlora.model import load_model, save_model
from napari_convlora.scanner_reference import (
    METADATA_KEY,
    SHRINK,
    feature_moments,
    from_batchnorms,
    learn_reference,
    reference_from_metadata,
)

from .conftest import make_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "add_scanner_reference.py"


def _images(volume, n=4):
    geometry, scaled = plan(volume, "tissue")
    stack = geometry.to_model(scaled)
    return torch.from_numpy(stack[select_slices(stack, n)][:, None].copy())


def _heads(means: list[list[float]]) -> list:
    """One layer of moments per head: the given channel means, unit variances."""
    return [[(np.asarray(m, dtype=float), np.ones(len(m)))] for m in means]


def test_a_channel_that_moves_with_anatomy_counts_less_than_one_that_moves_with_the_scanner():
    # channel 0 differs much from head to head, channel 1 hardly at all
    reference = learn_reference(_heads([[0.0, 0.0], [10.0, 0.1], [-10.0, -0.1]]), ["a", "b", "c"])
    off_in_anatomy = [(np.array([5.0, 0.0]), np.ones(2))]
    off_in_scanner = [(np.array([0.0, 5.0]), np.ones(2))]
    assert reference.distance(off_in_scanner) > 2 * reference.distance(off_in_anatomy)
    # the formula: spreads shrunk half-way to the layer's mean, log-variance term zero here
    spread = (1 - SHRINK) * np.array([100.0, 0.01]) + SHRINK * 50.005 + 1e-12
    assert reference.distance(off_in_anatomy) == pytest.approx(np.mean(np.array([25.0, 0.0]) / spread))
    # the log-variance counts too
    wider = [(np.zeros(2), np.full(2, np.e))]
    assert reference.distance(wider) > 0.0


def test_learning_needs_two_heads_and_the_distance_needs_every_layer():
    with pytest.raises(ValueError, match="two or more heads"):
        learn_reference(_heads([[0.0]]), ["a"])
    reference = learn_reference(_heads([[0.0], [1.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="layers"):
        reference.distance(_heads([[0.0]])[0] * 2)


def test_a_reference_survives_the_file_and_a_bad_one_is_refused_naming_the_file(tmp_path, small_volume):
    unet = make_model().unet
    moments = [feature_moments(unet, _images(small_volume)), feature_moments(unet, _images(small_volume, 6))]
    reference = learn_reference(moments, ["four", "six"])
    path = tmp_path / "m.safetensors"
    model = make_model()
    model.metadata[METADATA_KEY] = reference.as_metadata()
    save_model(model, path, training={"command": "tests"})
    again = reference_from_metadata(path, load_model(path).metadata, unet)
    assert again.heads == ("four", "six")
    for a, b in zip(reference.layers, again.layers, strict=True):
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.log_var_spread, b.log_var_spread)
    assert reference_from_metadata(path, {}, unet) is None

    good = reference.as_metadata()
    bad_layers = {**good, "layers": good["layers"][:-1]}
    nan = {**good, "layers": [{**good["layers"][0], "mean": [float("nan")] * len(good["layers"][0]["mean"])}]}
    nan["layers"] += good["layers"][1:]
    zero = {**good, "layers": [{**good["layers"][0], "mean_spread": [0.0] * len(good["layers"][0]["mean"])}]}
    zero["layers"] += good["layers"][1:]
    first = good["layers"][0]
    strings = {**good, "layers": [{**first, "mean": [str(v) for v in first["mean"]]}, *good["layers"][1:]]}
    huge = {**good, "layers": [{**first, "mean": [10**400] * len(first["mean"])}, *good["layers"][1:]]}
    not_dicts = {**good, "layers": [[1.0]] * len(good["layers"])}
    one_head = {**good, "heads": ["four"]}
    cases = (
        (bad_layers, "one entry per encoder batch norm"),
        (nan, "non-finite"),
        (zero, "> 0"),
        (strings, "numeric"),
        (huge, "numeric"),
        (not_dicts, "numeric"),
        (one_head, "two or more heads"),
        ("a string", "one entry per encoder batch norm"),
    )
    for broken, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            reference_from_metadata(path, {METADATA_KEY: broken}, unet)
        assert str(caught.value).startswith(str(path))


def test_auto_with_references_names_the_scanner_and_says_how(tmp_path, small_volume):
    torch.set_num_threads(1)
    base = make_model()
    inverted = replace(small_volume, data=small_volume.data.max() - small_volume.data)
    config = AdaptConfig(objective="early-head", slices=4, epochs=1, device="cpu")

    def with_reference(unet, volume):
        """Two "heads" of one scanner: the 4 slices auto reads, and 6 slices of the same volume."""
        moments = [feature_moments(unet, _images(volume, n)) for n in (4, 6)]
        return learn_reference(moments, ["x", "y"]).as_metadata()

    base.metadata[METADATA_KEY] = with_reference(base.unet, small_volume)
    files = {}
    for name, volume in (("plain", small_volume), ("flipped", inverted)):
        adapter = run_adaptation(base, volume, config, name).adapter
        adapter.metadata[METADATA_KEY] = with_reference(apply_adapter(base, adapter), volume)
        files[name] = save_adapter(adapter, tmp_path / f"{name}.safetensors")
    # an adapter without a reference is scored by its own statistics with the source model's spreads
    bare = run_adaptation(base, inverted, replace(config, seed=3), "bare").adapter
    files["bare"] = save_adapter(bare, tmp_path / "bare.safetensors")

    choice = choose_adapter(base, inverted, [files["plain"], files["flipped"]], device="cpu", slices=4)
    assert choice.label == "flipped" and "anatomy-weighted" in choice.reason and "2 heads" in choice.reason
    # a scan far from every reference still ranks the candidates: no score rounds to a tie at 0
    far = replace(inverted, data=np.where(inverted.data > inverted.data.mean(), inverted.data, 0.0))
    scores = choose_adapter(base, far, [files["plain"], files["flipped"]], device="cpu", slices=4).scores
    assert len(set(scores.values())) == 3 and min(scores.values()) > 0.0
    choice = choose_adapter(base, inverted, list(files.values()), device="cpu", slices=4)
    assert set(choice.scores) == {SOURCE, "plain", "flipped", "bare"} and choice.label in {"flipped", "bare"}
    assert all(0.0 <= score <= 1.0 for score in choice.scores.values())

    # every candidate is measured with the source reference's spreads
    source_reference = reference_from_metadata("m", base.metadata, base.unet)
    flipped = load_adapter(files["flipped"])
    unet = apply_adapter(base, flipped)
    own = reference_from_metadata("f", flipped.metadata, unet)
    shared = own.with_spreads_of(source_reference)
    assert shared.layers[0].mean is own.layers[0].mean
    assert shared.layers[0].mean_spread is source_reference.layers[0].mean_spread
    expected = 1.0 / (1.0 + shared.distance(feature_moments(unet, _images(inverted))))
    assert choice.scores["flipped"] == pytest.approx(expected)
    # the fallback is exactly the bare adapter's BN statistics with the source reference's spreads
    unet = apply_adapter(base, load_adapter(files["bare"]))
    fallback = from_batchnorms(unet, source_reference)
    assert all(isinstance(layer.mean, np.ndarray) for layer in fallback.layers)
    expected = 1.0 / (1.0 + fallback.distance(feature_moments(unet, _images(inverted))))
    assert choice.scores["bare"] == pytest.approx(expected)

    # a broken reference in an adapter file skips that adapter, with the reason kept
    broken = load_adapter(files["plain"])
    broken.metadata[METADATA_KEY] = {"heads": ["x"], "layers": []}
    save_adapter(broken, tmp_path / "broken.safetensors")
    choice = choose_adapter(base, small_volume, [tmp_path / "broken.safetensors"], device="cpu", slices=4)
    assert "broken" in choice.skipped and METADATA_KEY in choice.skipped["broken"]


def test_the_script_writes_references_and_leaves_weights_and_tensors_alone(
    tmp_path, small_path, small_mask_path, small_volume
):
    torch.set_num_threads(1)
    heads = tmp_path / "heads"
    for name in ("one", "two"):
        (heads / name).mkdir(parents=True)
        (heads / name / "t1.nii.gz").symlink_to(small_path)
        (heads / name / "mask_consensus.nii.gz").symlink_to(small_mask_path)
    model_path = tmp_path / "model.safetensors"
    base = make_model()
    before = save_model(base, model_path, training={"command": "tests"})
    adapter = run_adaptation(
        base, small_volume, AdaptConfig(objective="early-head", slices=2, epochs=1, device="cpu"), "ge-1.5t"
    ).adapter
    adapter_path = save_adapter(adapter, tmp_path / "ge-1.5t.safetensors")
    command = [sys.executable, str(SCRIPT), str(model_path), str(adapter_path), "--heads", str(heads), "--pool"]
    done = subprocess.run([*command, "one", "two"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    model = load_model(model_path)
    assert model.model_id == before and model.metadata[METADATA_KEY]["heads"] == ["one", "two"]
    written = load_adapter(adapter_path)
    assert written.metadata[METADATA_KEY]["heads"] == ["one", "two"]
    assert all(torch.equal(written.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    # a missing pool head: an error naming it, non-zero exit, the files as they were
    written_bytes = adapter_path.read_bytes()
    done = subprocess.run([*command, "one", "three"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "three" in done.stderr and adapter_path.read_bytes() == written_bytes
