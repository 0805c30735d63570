"""The learnt intensity curve: monotone, a no-op at the start, and it moves a scan's features towards the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_convlora.errors import InputError
from napari_convlora.geometry import plan, select_slices
from napari_convlora.inference import segment
from napari_convlora.intensity_curve import KNOTS, IntensityCurve, _heights, _through, fit_curve
from napari_convlora.objectives import ReferenceDistance
from napari_convlora.scanner_reference import (
    METADATA_KEY,
    feature_moments,
    learn_reference,
    required_reference,
)

from .conftest import make_model


def _stack(volume):
    geometry, scaled = plan(volume, "tissue")
    return geometry.to_model(scaled)


def _slices(stack, n=6):
    return torch.from_numpy(stack[select_slices(stack, n)][:, None].copy())


def _reference_of(unet, images):
    """A reference learnt from two 'heads': the slices as they are, and the same slices a little brighter."""
    return learn_reference([feature_moments(unet, images), feature_moments(unet, images * 1.05)], ["a", "b"])


def test_the_starting_curve_is_the_identity_and_every_curve_is_monotone():
    heights = _heights(torch.full((KNOTS,), float(np.log(np.expm1(1.0 / KNOTS)))))
    x = torch.linspace(0, 1, 101)
    torch.testing.assert_close(_through(x, heights), x, atol=1e-6, rtol=0)
    wild = _heights(torch.randn(KNOTS) * 3)
    assert torch.all(torch.diff(_through(x, wild)) >= 0)
    curve = IntensityCurve(tuple(float(h) for h in wild))
    volume = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    mapped = curve.apply(volume.copy())
    assert mapped.dtype == np.float32
    order = np.argsort(volume, axis=None)
    assert np.all(np.diff(mapped.ravel()[order]) >= -1e-6)  # the intensity order is kept
    for bad in ((0.5, 1.0), (0.0, 0.6, 0.4), (0.0, float("nan")), (0.0,)):
        with pytest.raises(ValueError):
            IntensityCurve(bad)


def test_the_reference_distance_loss_is_the_reference_distance(small_volume):
    """The differentiable loss the curve is trained on equals ScannerReference.distance on the same moments."""
    unet = make_model().unet.eval()
    images = _slices(_stack(small_volume))
    reference = _reference_of(unet, images)
    shifted = images**1.5
    with torch.no_grad():
        loss = float(ReferenceDistance(unet, reference, "cpu").loss(unet, shifted))
    assert loss == pytest.approx(reference.distance(feature_moments(unet, shifted)), rel=1e-3)


def test_a_fit_brings_a_darkened_scan_back_towards_the_reference_and_touches_no_weight(small_volume):
    torch.manual_seed(0)
    unet = make_model().unet.eval()
    images = _slices(_stack(small_volume))
    reference = _reference_of(unet, images)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = [p.requires_grad for p in unet.parameters()]
    darker = images**2  # a contrast change a monotone curve can undo
    fit = fit_curve(unet, reference, darker, steps=40)
    assert fit is not None and fit.best_step > 0
    assert fit.distance_after < 0.5 * fit.distance_before
    heights = np.asarray(fit.curve.heights)
    assert heights[KNOTS // 2] > 0.5 * 1.1  # brightened where x**2 darkened: above the identity's 0.5
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, weights[key])
    assert [p.requires_grad for p in unet.parameters()] == trainable  # as the caller left them
    assert fit_curve(unet, reference, darker, should_stop=lambda: True) is None


def test_segment_reads_the_scan_through_the_curve(model, small_volume):
    plain = segment(model, small_volume, device="cpu")
    identity = IntensityCurve(tuple(np.linspace(0.0, 1.0, KNOTS + 1)))
    same = segment(model, small_volume, device="cpu", curve=identity)
    np.testing.assert_allclose(same.probability, plain.probability, atol=1e-5)
    flat = IntensityCurve((0.0, 0.0))  # every voxel to 0: the model sees nothing of the head
    dark = segment(model, small_volume, device="cpu", curve=flat, two_pass=False)
    assert not np.allclose(dark.probability, plain.probability, atol=1e-3)


def test_a_model_without_a_scanner_reference_is_refused_naming_its_file(model_file):
    from napari_convlora.model import load_model

    base = load_model(model_file)
    assert METADATA_KEY not in base.metadata
    with pytest.raises(InputError, match="carries no scanner reference") as caught:
        required_reference(base, "the curve")
    assert str(caught.value).startswith(str(model_file))
