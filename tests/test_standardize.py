"""Intensity standardisation: landmarks of the head mapped onto the training heads', stored with the model."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from napari_convlora.adapters import Adapter
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan
from napari_convlora.inference import segment
from napari_convlora.library import default_model_path
from napari_convlora.model import load_model, save_model
from napari_convlora.nifti import load_volume
from napari_convlora.standardize import (
    BRAIN_PERCENTILES,
    METADATA_KEY,
    PERCENTILES,
    IntensityReference,
    brain_landmarks,
    head_landmarks,
    learn_reference,
    standardize,
)

from .conftest import drive, with_scanner_reference

# simulate.py's GE 1.5 T, Siemens 3 T and Philips 3 T contrasts: monotone changes of every intensity
_CONTRASTS = [
    ((0.0, 0.2, 0.42, 0.55, 0.75, 1.0), (0.0, 0.32, 0.46, 0.54, 0.58, 0.66)),
    ((0.0, 0.2, 0.42, 0.55, 0.8, 1.0), (0.0, 0.08, 0.38, 0.74, 0.8, 0.85)),
    ((0.0, 0.2, 0.42, 0.55, 0.8, 1.0), (0.0, 0.1, 0.34, 0.68, 0.95, 1.0)),
]


@pytest.fixture(scope="module")
def scaled(small_volume) -> np.ndarray:
    return plan(small_volume, "tissue")[1]


def test_landmarks_are_the_head_percentiles_in_order(scaled):
    found = head_landmarks(scaled)
    assert found is not None and len(found) == len(PERCENTILES)
    assert np.all(np.diff(found) >= 0) and 0 < found[0] < found[-1] <= 1


def test_the_map_puts_a_scans_landmarks_on_the_reference(scaled):
    reference = IntensityReference(tuple(np.linspace(0.25, 0.9, len(PERCENTILES))), 1)
    sample = scaled[::2, ::2, ::2]
    head = sample > threshold_otsu(sample)  # the voxels the landmarks were measured on
    out = standardize(scaled.copy(), reference)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.percentile(out[::2, ::2, ::2][head], PERCENTILES) == pytest.approx(reference.values, abs=0.005)


@pytest.mark.parametrize("contrast", _CONTRASTS, ids=["ge-1.5t", "siemens-3t", "philips-3t"])
def test_standardising_moves_a_changed_contrast_back_inside_the_brain(small_volume, small_mask_path, contrast):
    """A monotone contrast change (simulate.py's), standardised to the scan's own landmarks, comes part way back.

    Only part way (inside the brain 22%, 41% and 10% of the change undone at 4 mm): the
    landmarks' population, the head above Otsu's threshold, is itself moved by the change.
    """
    geometry, scaled = plan(small_volume, "tissue")
    brain = geometry.to_ras(load_volume(small_mask_path).data > 0)
    reference = IntensityReference(tuple(head_landmarks(scaled)), 1)
    changed = np.interp(scaled, *contrast).astype(np.float32)
    before = np.abs(changed - scaled)[brain].mean()
    after = np.abs(standardize(changed.copy(), reference) - scaled)[brain].mean()
    assert after < before


@pytest.fixture(scope="module")
def ras_brain(small_volume, small_mask_path) -> np.ndarray:
    geometry, _ = plan(small_volume, "tissue")
    return geometry.to_ras(load_volume(small_mask_path).data > 0)


def test_the_brain_step_puts_the_brains_landmarks_on_the_reference(scaled, ras_brain):
    head = head_landmarks(scaled)
    reference = IntensityReference(tuple(head), 1, (0.3, 0.7))
    head_only = standardize(scaled.copy(), reference)
    out = standardize(scaled.copy(), reference, ras_brain)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert brain_landmarks(out, ras_brain) == pytest.approx((0.3, 0.7), abs=0.005)
    assert brain_landmarks(head_only, ras_brain) != pytest.approx((0.3, 0.7), abs=0.05)  # the step did it
    flat, order = out.ravel(), np.argsort(scaled.ravel(), kind="stable")
    assert np.all(np.diff(flat[order]) >= 0)  # still one increasing map of intensity


def test_the_brain_step_undoes_a_3t_contrast_better_than_the_head_alone(small_volume, ras_brain):
    """simulate.py's Siemens 3 T contrast (crisp grey/white, fat darker than white matter at the top): the head's
    landmarks are moved by the fat, the brain's are not (the reason for the step)."""
    _, scaled = plan(small_volume, "tissue")
    reference = IntensityReference(tuple(head_landmarks(scaled)), 1, tuple(brain_landmarks(scaled, ras_brain)))
    changed = np.interp(scaled, *_CONTRASTS[1]).astype(np.float32)
    head_only = np.abs(standardize(changed.copy(), reference) - scaled)[ras_brain].mean()
    with_brain = np.abs(standardize(changed.copy(), reference, ras_brain) - scaled)[ras_brain].mean()
    assert with_brain < head_only


def test_too_little_brain_leaves_the_head_step_alone(scaled):
    reference = IntensityReference(tuple(head_landmarks(scaled)), 1, (0.3, 0.7))
    speck = np.zeros(scaled.shape, bool)
    speck[20:23, 20:23, 20:23] = True  # 27 voxels, 1 after the erosion
    assert brain_landmarks(scaled, speck) is None
    assert np.array_equal(standardize(scaled.copy(), reference, speck), standardize(scaled.copy(), reference))


def test_a_brain_step_needs_brain_landmarks(scaled, ras_brain):
    with pytest.raises(InputError, match="no brain intensity landmarks"):
        standardize(scaled.copy(), IntensityReference(tuple(head_landmarks(scaled)), 1), ras_brain)


def test_the_map_keeps_the_order_of_intensities(scaled):
    reference = IntensityReference(tuple(np.linspace(0.1, 0.6, len(PERCENTILES))), 1)
    flat = scaled.ravel()
    order = np.argsort(flat, kind="stable")
    mapped = standardize(scaled.copy(), reference).ravel()
    assert np.all(np.diff(mapped[order]) >= 0)


def test_a_volume_without_a_head_is_left_as_it_is():
    empty = np.zeros((8, 8, 8), np.float32)
    reference = IntensityReference(tuple(np.linspace(0.2, 0.9, len(PERCENTILES))), 1)
    assert head_landmarks(empty) is None
    assert np.array_equal(standardize(empty.copy(), reference), empty)
    with pytest.raises(InputError, match="no training head"):
        learn_reference([None])


_GOOD = {"values": list(np.linspace(0.1, 0.9, 9)), "percentiles": list(PERCENTILES), "heads": 1}


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {METADATA_KEY: {"values": [0.1, 0.2], "percentiles": [1, 99], "heads": 1}},
        {METADATA_KEY: {"values": list(np.linspace(0.9, 0.1, 9)), "percentiles": list(PERCENTILES), "heads": 1}},
        {METADATA_KEY: {"values": "x", "percentiles": list(PERCENTILES), "heads": 1}},
        {METADATA_KEY: {**_GOOD, "brain_values": [0.7, 0.3], "brain_percentiles": list(BRAIN_PERCENTILES)}},
        {METADATA_KEY: {**_GOOD, "brain_values": [0.3, 0.7], "brain_percentiles": [5, 95]}},
        {METADATA_KEY: {**_GOOD, "brain_values": [0.3, 0.7]}},
    ],
)
def test_a_model_without_usable_landmarks_is_refused_by_name(metadata):
    with pytest.raises(InputError, match=r"model\.safetensors"):
        IntensityReference.from_metadata(metadata, "model.safetensors")


def test_landmarks_survive_save_and_load_and_leave_the_model_id(tmp_path, model, scaled, ras_brain):
    with_landmarks = model.copy()
    reference = learn_reference([head_landmarks(scaled)], [brain_landmarks(scaled, ras_brain), None])
    with_landmarks.metadata[METADATA_KEY] = reference.as_metadata()
    model_id = save_model(with_landmarks, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert model_id == model.model_id == loaded.model_id
    assert IntensityReference.of_model(loaded).values == pytest.approx(head_landmarks(scaled), abs=1e-5)
    assert IntensityReference.of_model(loaded).brain == pytest.approx(brain_landmarks(scaled, ras_brain), abs=1e-5)
    older = {METADATA_KEY: {k: v for k, v in reference.as_metadata().items() if not k.startswith("brain")}}
    assert IntensityReference.from_metadata(older, "m").brain is None  # a model of before: the head step only


def test_the_shipped_model_carries_landmarks_from_its_eight_heads():
    reference = IntensityReference.of_model(load_model(default_model_path()))
    assert reference.heads == 8
    assert 0.2 < reference.values[0] < reference.values[4] < reference.values[-1] < 1
    assert reference.brain is not None and reference.values[0] < reference.brain[0] < reference.brain[1] < 1


def test_segment_standardises_when_asked(model_file, small_volume):
    base = load_model(model_file)
    plain = segment(base, small_volume, device="cpu").probability
    asked = segment(base, small_volume, device="cpu", standardize=True).probability
    assert not np.allclose(plain, asked)


def test_standardising_with_a_model_without_landmarks_fails_before_any_work(model, small_volume):
    with pytest.raises(InputError, match="no intensity landmarks"):
        segment(model, small_volume, device="cpu", standardize=True)


def test_cli_segment_standardize(capsys, tmp_path, small_path, model_file, model):
    out = tmp_path / "m.nii.gz"
    assert main(["segment", str(small_path), "-o", str(out), "--model", str(model_file), "--standardize"]) == 0
    assert out.exists()
    old = tmp_path / "old.safetensors"  # a model made before train-source wrote landmarks
    save_model(model, old, training={"command": "tests: random weights"})
    capsys.readouterr()
    code = main(["segment", str(small_path), "-o", str(tmp_path / "n.nii.gz"), "--model", str(old), "--standardize"])
    err = capsys.readouterr().err
    assert code == 2 and "no intensity landmarks" in err and str(old) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.nii.gz").exists()


def test_an_adapter_adapted_on_standardised_slices_says_so_and_standardises(model_file, small_volume, gate_open):
    from napari_convlora.adapt import AdaptConfig, run_adaptation

    base = load_model(model_file)
    config = AdaptConfig(objective="early-head", slices=2, epochs=1, device="cpu", gate="consistency", standardize=True)
    adapter = run_adaptation(base, small_volume, config).adapter
    assert adapter.metadata["standardize"] is True and adapter.standardizes
    unflagged = Adapter(adapter.tensors, {**adapter.metadata, "standardize": False})
    flagged = segment(base, small_volume, adapter, device="cpu").probability
    assert np.array_equal(flagged, segment(base, small_volume, unflagged, device="cpu", standardize=True).probability)
    assert not np.allclose(flagged, segment(base, small_volume, unflagged, device="cpu").probability)


def test_cli_adapt_standardize_on_a_model_without_landmarks_fails_cleanly(
    capsys, tmp_path, monkeypatch, small_path, model
):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    old = tmp_path / "old.safetensors"
    save_model(model, old, training={"command": "tests: random weights"})
    out = tmp_path / "a.safetensors"
    code = main(
        ["adapt", str(small_path), "-o", str(out), "--model", str(old), "--standardize", "--objective", "early-head"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no intensity landmarks" in err and str(old) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_auto_keeps_the_brain_step_if_surer_by_the_lead_then_the_gated_head_step(model_file, small_volume):
    from napari_convlora.selection import (
        BRAIN_STEP_LEAD,
        accepted_by_confidence,
        iter_plain_and_standardized,
        mask_confidence,
    )

    base = load_model(model_file)
    assert IntensityReference.of_model(base).brain is not None  # the shipped model's landmarks: both steps
    reports, choice = drive(iter_plain_and_standardized(base, small_volume, device="cpu"))
    assert reports[-1].done == reports[-1].total  # progress counts the three runs
    plain = segment(base, small_volume, device="cpu")
    head = segment(base, small_volume, device="cpu", standardize=True)
    brain = segment(base, small_volume, device="cpu", standardize=True, brain=head.mask)
    for made, expected in ((choice.plain, plain), (choice.standardized, head), (choice.brain, brain)):
        assert np.array_equal(made.mask, expected.mask)
    plain_, head_, brain_ = (mask_confidence(r.probability, r.mask) for r in (plain, head, brain))
    if brain_ >= max(plain_, head_) + BRAIN_STEP_LEAD:
        kept = choice.brain
    else:
        kept = choice.standardized if accepted_by_confidence(head_, plain_) else choice.plain
    assert choice.kept is kept and choice.is_standardized == (kept is not choice.plain)
    assert choice.note.startswith("intensities standardised" if choice.is_standardized else "intensities kept")
    assert choice.seconds == pytest.approx(sum(r.seconds for r in (choice.plain, choice.standardized, choice.brain)))
    # the plain segmentation given: only the standardised runs are made, and the verdict is the same
    three = reports[-1].total
    reports, again = drive(iter_plain_and_standardized(base, small_volume, device="cpu", plain=plain))
    assert again.plain is plain and again.note == choice.note
    assert reports[-1].total == reports[-1].done < three


@pytest.mark.parametrize(
    ("sure", "kept"),
    [
        ((0.74, 0.70, 0.744), "brain"),  # surer than as it is by more than the lead
        ((0.74, 0.70, 0.742), "plain"),  # surer by less: not kept, and the head step does not pass the gate
        ((0.74, 0.70, 0.739), "plain"),  # about as sure as the others: not kept
        ((0.74, 0.76, 0.764), "brain"),  # surer than the surer other, the head step, by more than the lead
        ((0.74, 0.76, 0.762), "head"),  # by less; the head step passes the sure-source margin
        ((0.74, 0.75, 0.76), "brain"),
        ((0.74, 0.75, 0.752), "plain"),  # the head step surer, but not enough for the gate
        ((0.60, 0.61, 0.50), "head"),  # an unsure source model: any gain passes
    ],
)
def test_which_mask_auto_keeps_for_given_confidences(monkeypatch, model_file, small_volume, sure, kept):
    from napari_convlora import selection

    values = iter(sure)  # the order the rule reads them: as it is, head step, brain step
    monkeypatch.setattr(selection, "mask_confidence", lambda probability, mask: next(values))
    _, choice = drive(selection.iter_plain_and_standardized(load_model(model_file), small_volume, device="cpu"))
    assert choice.kept is {"plain": choice.plain, "head": choice.standardized, "brain": choice.brain}[kept]
    assert choice.note.startswith("intensities kept" if kept == "plain" else f"intensities standardised, {kept}")


def _with_scanner_reference(model_file, tmp_path, volume):
    return load_model(with_scanner_reference(model_file, tmp_path / "referenced.safetensors", volume))


def test_input_distances_find_the_scan_as_it_is_nearest_a_reference_learnt_from_it(tmp_path, model_file, small_volume):
    from napari_convlora import selection
    from napari_convlora.scanner_reference import reference_from_metadata
    from napari_convlora.selection import input_distances

    base = _with_scanner_reference(model_file, tmp_path, small_volume)
    reference = reference_from_metadata("test", base.metadata, base.unet)
    head = segment(base, small_volume, device="cpu", standardize=True)
    plain, head_step, brain_step = input_distances(base, small_volume, reference, head.mask, device="cpu")
    assert plain < min(head_step, brain_step)  # standardising moves this scan away from itself
    # auto measures the same distances (the scan as it is nearest: the brain step is not kept by them)
    _, choice = drive(selection.iter_plain_and_standardized(base, small_volume, device="cpu"))
    assert np.array_equal(choice.standardized.mask, head.mask) and choice.kept is not choice.brain
    assert choice.curve is not None and "learnt intensity curve: mask confidence" in choice.note
    distances = f"{plain:.2f} as it is, {head_step:.2f} head standardised, {brain_step:.2f} brain standardised"
    assert f"feature distance from the training heads {distances};" in choice.note
    assert f"feature distance {plain:.2f} -> " in choice.note  # the curve starts from the plain scan's slices


def test_auto_reports_the_curve_fit_and_stops_in_it(monkeypatch, tmp_path, model_file, small_volume):
    from napari_convlora import selection
    from napari_convlora.intensity_curve import STEPS, CurveStep

    base = _with_scanner_reference(model_file, tmp_path, small_volume)
    monkeypatch.setattr(selection, "iter_segment", lambda *a, **k: pytest.fail("segmented before the fit ended"))
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    reports, choice = drive(selection.iter_plain_and_standardized(base, small_volume, device="cpu", should_stop=stop))
    assert choice is None
    assert [r.step for r in reports] == [1, 2, 3] and {r.steps for r in reports} == {STEPS}
    assert all(isinstance(r, CurveStep) for r in reports)


def _identity_fit(*args, **kwargs):
    from napari_convlora.intensity_curve import CurveFit, IntensityCurve

    yield from ()
    return CurveFit(IntensityCurve((0.0, 1.0)), 1.0, 1.0, 0)


@pytest.mark.parametrize(
    ("far", "sure", "kept"),
    [  # confidences: plain, head step, brain step, then the curve (less sure than the plain mask: not kept)
        ((3.0, 2.0, 1.0), (0.70, 0.70, 0.71, 0.69), "brain"),  # nearest by more than the lead, surer than plain
        ((3.0, 2.0, 1.0), (0.70, 0.72, 0.70, 0.69), "brain"),  # as sure as the plain mask is enough
        ((3.0, 2.0, 1.0), (0.70, 0.70, 0.69, 0.69), "plain"),  # less sure than the plain mask; the head step fails
        ((3.0, 2.0, 1.0), (0.60, 0.65, 0.59, 0.59), "head"),  # less sure; the head step passes the gate (unsure source)
        ((1.2, 2.0, 0.9), (0.60, 0.61, 0.70, 0.59), "head"),  # nearest but within the lead of the scan as it is
        ((3.0, 1.0, 2.0), (0.60, 0.61, 0.75, 0.59), "head"),  # the head step nearer: the surest is not kept by it
        ((1.0, 2.0, 3.0), (0.74, 0.74, 0.76, 0.73), "plain"),  # the scan as it is nearest; the head step fails
        # the curve's mask as sure as the plain one, or surer, and the brain step no farther than the scan: kept
        ((3.0, 2.0, 1.0), (0.70, 0.70, 0.71, 0.70), "curve"),
        ((1.2, 2.0, 0.9), (0.60, 0.61, 0.70, 0.61), "curve"),  # the brain step nearer by less than the lead
        ((1.0, 2.0, 1.0), (0.74, 0.74, 0.73, 0.745), "curve"),  # as near: enough
        ((1.0, 2.0, 3.0), (0.74, 0.74, 0.76, 0.745), "plain"),  # the brain step farther: the curve is not kept
    ],
)
def test_with_a_scanner_reference_auto_keeps_the_brain_step_by_distance(
    monkeypatch, tmp_path, model_file, small_volume, far, sure, kept
):
    from napari_convlora import selection

    assert selection.DISTANCE_LEAD == 0.4  # the cases above straddle it
    base = _with_scanner_reference(model_file, tmp_path, small_volume)
    values = iter(sure)
    monkeypatch.setattr(selection, "mask_confidence", lambda probability, mask: next(values))
    monkeypatch.setattr(selection, "input_distances", lambda *args, **kwargs: list(far))
    monkeypatch.setattr(selection, "iter_fit_curve", _identity_fit)  # the rule is under test here, not the fit
    _, choice = drive(selection.iter_plain_and_standardized(base, small_volume, device="cpu"))
    masks = {"plain": choice.plain, "head": choice.standardized, "brain": choice.brain, "curve": choice.curve}
    assert choice.kept is masks[kept]
    start = {"plain": "intensities kept", "curve": "intensities through the learnt curve"}
    assert choice.note.startswith(start.get(kept, f"intensities standardised, {kept}"))
    assert f"feature distance from the training heads {far[0]:.2f} as it is" in choice.note


def test_with_an_adapter_auto_keeps_the_confidence_rule(monkeypatch, tmp_path, model_file, small_volume):
    from napari_convlora import selection
    from napari_convlora.adapters import extract_adapter, inject_adapters, new_metadata

    base = _with_scanner_reference(model_file, tmp_path, small_volume)
    unet = base.copy().unet
    inject_adapters(unet, "convlora")
    adapter = extract_adapter(unet, new_metadata(base, "a", rank=2, alpha=2.0))
    values = iter((0.70, 0.70, 0.75))  # the brain step surer by more than the lead: kept by confidence
    monkeypatch.setattr(selection, "mask_confidence", lambda probability, mask: next(values))
    monkeypatch.setattr(selection, "input_distances", lambda *args, **kwargs: pytest.fail("distances measured"))
    _, choice = drive(selection.iter_plain_and_standardized(base, small_volume, adapter, device="cpu"))
    assert choice.kept is choice.brain and "feature distance" not in choice.note


def test_a_broken_scanner_reference_is_refused_before_any_segmentation(tmp_path, model_file, small_volume):
    from napari_convlora.scanner_reference import METADATA_KEY as REFERENCE_KEY
    from napari_convlora.selection import iter_plain_and_standardized

    model = load_model(model_file)
    model.metadata[REFERENCE_KEY] = {"heads": ["a", "b"], "layers": []}
    save_model(model, tmp_path / "broken.safetensors")
    generator = iter_plain_and_standardized(load_model(tmp_path / "broken.safetensors"), small_volume, device="cpu")
    with pytest.raises(InputError, match=r"broken\.safetensors") as caught:
        next(generator)
    assert "scanner_reference" in str(caught.value)


def test_auto_with_a_model_of_before_tries_the_head_step_only(tmp_path, model_file, small_volume):
    from napari_convlora.selection import iter_plain_and_standardized

    older = load_model(model_file)
    entry = older.metadata[METADATA_KEY]
    older.metadata[METADATA_KEY] = {k: v for k, v in entry.items() if not k.startswith("brain")}
    save_model(older, tmp_path / "older.safetensors")
    reports, choice = drive(iter_plain_and_standardized(load_model(tmp_path / "older.safetensors"), small_volume))
    assert choice.brain is None and "brain" not in choice.note and reports[-1].done == reports[-1].total


def test_cli_segment_standardize_auto(capsys, tmp_path, small_path, model_file):
    import json

    out = tmp_path / "m.nii.gz"
    args = ["segment", str(small_path), "-o", str(out), "--model", str(model_file), "--standardize", "auto"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["standardize"].startswith("intensities")
    assert "note: intensities" in captured.err and out.exists()
    code = main([*args, "--adapter", "auto", "--overwrite"])
    assert code == 2 and "--standardize auto and --adapter auto" in capsys.readouterr().err


def test_the_cli_help_states_the_leads_auto_keeps_the_brain_step_by():
    from napari_convlora.cli import STANDARDIZE_HELP
    from napari_convlora.selection import BRAIN_STEP_LEAD, DISTANCE_LEAD

    assert f"by {BRAIN_STEP_LEAD}," in " ".join(STANDARDIZE_HELP.split())
    assert f"by {DISTANCE_LEAD} (the model's scanner reference)" in " ".join(STANDARDIZE_HELP.split())
