"""The ``intensity`` objective: ``--standardize auto``'s choice kept as an adapter file that reproduces it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_convlora.adapt import AdaptCancelled, AdaptConfig, AdaptDone, adapt, run_adaptation
from napari_convlora.adapters import load_adapter, save_adapter
from napari_convlora.errors import InputError
from napari_convlora.inference import segment
from napari_convlora.intensity_curve import CurveStep
from napari_convlora.intensity_map import IDENTITY
from napari_convlora.model import load_model

from .conftest import drive, with_scanner_reference


@pytest.fixture(scope="module")
def referenced(tmp_path_factory, model_file, small_volume):
    out = tmp_path_factory.mktemp("ref") / "m.safetensors"
    return load_model(with_scanner_reference(model_file, out, small_volume))


def _forced(monkeypatch, sure, far=(3.0, 2.0, 1.0)):
    """Make auto's rule keep a chosen mask: the confidences (plain, head, brain, curve) and distances given."""
    from napari_convlora import selection

    values = iter(sure)
    monkeypatch.setattr(selection, "mask_confidence", lambda probability, mask: next(values))
    monkeypatch.setattr(selection, "input_distances", lambda *args, **kwargs: list(far))


def test_the_default_objective_keeps_autos_choice_and_its_file_reproduces_the_mask(tmp_path, referenced, small_volume):
    assert AdaptConfig().objective == "intensity"
    reports, _ = drive(adapt(referenced, small_volume, AdaptConfig(device="cpu"), name="scanner-a"))
    done = reports[-1]
    assert isinstance(done, AdaptDone)
    assert any(isinstance(r, CurveStep) for r in reports)
    adapter = done.adapter
    assert adapter.metadata["kind"] == "intensity" and adapter.tensors == {}
    assert adapter.metadata["input"] in ("plain", "head", "brain", "curve")
    assert done.accepted == (adapter.metadata["input"] != "plain")
    assert done.gate_text == done.note and done.note.startswith("intensities")
    loaded = load_adapter(save_adapter(adapter, tmp_path / "scanner-a.safetensors"))
    assert loaded.curve == adapter.curve
    again = segment(referenced, small_volume, loaded, device="cpu")
    assert np.array_equal(again.mask, done.segmentation.mask)


@pytest.mark.parametrize(
    ("sure", "kept"),
    [  # confidences plain, head step, brain step, curve (distances: the brain step nearest by more than the lead)
        ((0.70, 0.70, 0.69, 0.69), "plain"),
        ((0.60, 0.65, 0.59, 0.59), "head"),
        ((0.70, 0.70, 0.71, 0.69), "brain"),
        ((0.70, 0.70, 0.71, 0.70), "curve"),
    ],
)
def test_the_adapter_holds_the_map_the_kept_mask_read(monkeypatch, referenced, small_volume, sure, kept):
    _forced(monkeypatch, sure)
    done = run_adaptation(referenced, small_volume, AdaptConfig(device="cpu"))
    assert done.adapter.metadata["input"] == kept
    assert done.accepted == (kept != "plain")
    assert (done.adapter.curve == IDENTITY) == (kept == "plain")
    # the map as one curve gives the mask the rule kept, read through standardisation's own steps
    again = segment(referenced, small_volume, done.adapter, device="cpu")
    agree = np.mean(again.mask == done.segmentation.mask)
    assert agree > 0.999, agree
    assert np.abs(again.probability - done.segmentation.probability).max() < 1e-3


def test_a_model_without_landmarks_is_refused_by_name_before_any_work(tmp_path, model, small_volume):
    model.path = tmp_path / "bare.safetensors"
    with pytest.raises(InputError, match=r"bare\.safetensors.*no intensity landmarks"):
        next(adapt(model, small_volume, AdaptConfig(device="cpu")))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"kind": "moe"}, "trains none"), ({"standardize": True}, "leave out --standardize")],
)
def test_options_of_trained_adapters_are_refused_with_the_intensity_objective(options, message):
    with pytest.raises(InputError, match=message):
        AdaptConfig(objective="intensity", **options).check()


def test_stopping_in_the_curve_fit_writes_nothing(referenced, small_volume):
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    reports, _ = drive(adapt(referenced, small_volume, AdaptConfig(device="cpu"), should_stop=stop))
    assert isinstance(reports[-1], AdaptCancelled)
    assert not any(isinstance(r, AdaptDone) for r in reports)


def test_an_intensity_adapter_maps_the_scan_its_own_way_whatever_standardisation_says(
    tmp_path, monkeypatch, referenced, small_volume
):
    from napari_convlora.selection import iter_plain_and_standardized

    _forced(monkeypatch, (0.60, 0.65, 0.59, 0.59))
    done = run_adaptation(referenced, small_volume, AdaptConfig(device="cpu"))
    adapter = load_adapter(save_adapter(done.adapter, tmp_path / "head.safetensors"))
    alone = segment(referenced, small_volume, adapter, device="cpu")
    asked = segment(referenced, small_volume, adapter, device="cpu", standardize=True)
    assert np.array_equal(alone.probability, asked.probability)
    with pytest.raises(InputError, match=r"head\.safetensors: an intensity adapter maps .* nothing for"):
        drive(iter_plain_and_standardized(referenced, small_volume, adapter, device="cpu"))


def _intensity_adapter(base, path, curve):
    from napari_convlora.adapters import CURVE_KEY, INTENSITY_KIND, Adapter, new_metadata

    metadata = new_metadata(base, path.stem, kind=INTENSITY_KIND)
    metadata[CURVE_KEY] = curve.as_metadata()
    return save_adapter(Adapter({}, metadata), path)


def test_auto_pick_scores_an_intensity_adapter_on_the_scan_through_its_map(tmp_path, referenced, small_volume):
    from napari_convlora.choose import SOURCE, choose_adapter
    from napari_convlora.intensity_map import IntensityCurve

    same = _intensity_adapter(referenced, tmp_path / "same.safetensors", IDENTITY)
    # most of the head pushed dark: far from the training heads the reference was learnt on (this scan as it is)
    dark = _intensity_adapter(referenced, tmp_path / "dark.safetensors", IntensityCurve((0.0, 0.05, 1.0), (0, 0.8, 1)))
    choice = choose_adapter(referenced, small_volume, [same, dark], device="cpu")
    assert choice.scores["same"] == choice.scores[SOURCE]  # the identity map: the source model's very score
    assert choice.scores["dark"] < choice.scores[SOURCE]
    assert choice.label == SOURCE  # ties go to the source model


def test_a_malformed_or_stuffed_intensity_adapter_is_refused_by_name(tmp_path, referenced):
    import json

    from safetensors.torch import save_file

    from napari_convlora.adapters import CURVE_KEY, INTENSITY_KIND, new_metadata
    from napari_convlora.model import METADATA_KEY

    metadata = new_metadata(referenced, "bad", kind=INTENSITY_KIND)
    for name, curve, tensors in [
        ("falling", {"knots": [0, 0.5, 1], "heights": [0, 0.6, 0.4]}, {}),
        ("missing", None, {}),
        ("stuffed", IDENTITY.as_metadata(), {"x": torch.zeros(2)}),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps({**metadata, CURVE_KEY: curve})})
        message = "holds no tensors" if tensors else "intensity curve is malformed"
        with pytest.raises(InputError, match=f"{name}\\.safetensors: .*{message}"):
            load_adapter(path)
