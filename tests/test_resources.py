"""What the package ships: the source model, one adapter per simulated profile, the sample."""

from __future__ import annotations

import pytest

from napari_convlora.adapters import apply_adapter, load_adapter
from napari_convlora.library import BUILTIN_ADAPTERS, SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.simulate import PROFILES


@pytest.fixture(scope="module")
def shipped():
    return load_model(SOURCE_MODEL)


# the source profile too: its AdaBN statistics are what auto-pick compares a source-like scan with;
# no built-in for a stress (non-T1) profile: no user scanner looks like one
@pytest.mark.parametrize("profile", [name for name, p in PROFILES.items() if not p.stress])
def test_one_small_adapter_per_profile_fits_the_shipped_model(shipped, profile):
    path = BUILTIN_ADAPTERS / f"{profile}.safetensors"
    assert path.stat().st_size < 1_000_000
    adapter = load_adapter(path)
    assert adapter.name == profile
    assert adapter.base_model_id == shipped.model_id
    assert "input" not in adapter.metadata  # never names the scan it was made from
    apply_adapter(shipped, adapter)  # tensors fit, or this raises


def test_shipped_model_metadata_records_how_it_was_made(shipped):
    """Every stage of its training, back to the one from random weights: command, settings, data, revision."""
    training = shipped.metadata["training"]
    while training is not None:
        assert training["command"].startswith("convlora train-source")
        assert isinstance(training["config"]["seed"], int) and training["git_revision"] and training["data"]
        init = training.get("init")
        training = None if init is None else init["training"]
        if init is not None:
            assert len(init["model_id"]) == 64
