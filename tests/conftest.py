"""Shared fixtures: real volumes from the repository and small random models.

The models are untrained (random weights, fixed seed): the tests check
mechanics (geometry, exactness, refusals, reproducibility), not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_to_output

from napari_convlora.library import default_model_path
from napari_convlora.model import build_model, load_model, save_model
from napari_convlora.nifti import Volume, load_volume
from napari_convlora.shape_prior import METADATA_KEY as PRIOR_KEY
from napari_convlora.shape_prior import learn_shape_prior
from napari_convlora.standardize import METADATA_KEY as LANDMARKS_KEY
from napari_convlora.training import load_heads

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_T1 = ROOT / "resources" / "sample" / "colin27_t1.nii.gz"
SAMPLE_MASK = ROOT / "resources" / "sample" / "colin27_mask_consensus.nii.gz"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def sample_img() -> nib.Nifti1Image:
    return nib.load(str(SAMPLE_T1))


@pytest.fixture(scope="session")
def small_path(tmp_path_factory, sample_img) -> Path:
    """The sample head resampled to 4 mm (46x55x46): real anatomy, fast to run a model on."""
    small = resample_to_output(sample_img, voxel_sizes=(4.0, 4.0, 4.0), order=1)
    path = tmp_path_factory.mktemp("small") / "head4mm.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(small.dataobj).astype(np.float32), small.affine), str(path))
    return path


@pytest.fixture(scope="session")
def small_mask_path(tmp_path_factory) -> Path:
    """The sample's consensus mask on the 4 mm grid of ``small_path``."""
    small = resample_to_output(nib.load(str(SAMPLE_MASK)), voxel_sizes=(4.0, 4.0, 4.0), order=1)
    path = tmp_path_factory.mktemp("small_mask") / "mask4mm.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(small.dataobj) > 0.5).astype(np.uint8), small.affine), str(path))
    return path


@pytest.fixture(scope="session")
def small_volume(small_path) -> Volume:
    return load_volume(small_path)


def make_model(width: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(width).eval()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, small_path, small_mask_path) -> Path:
    """Random weights, with the size prior ``train-source`` would write (the small head's) and intensity landmarks."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    model = make_model()
    head = load_heads([(small_path, small_mask_path)])[0]
    model.metadata[PRIOR_KEY] = learn_shape_prior([head.masks]).as_metadata()
    # the shipped model's landmarks (its eight heads), not the small head's own: standardising must change it
    model.metadata[LANDMARKS_KEY] = load_model(default_model_path()).metadata[LANDMARKS_KEY]
    save_model(model, path, training={"command": "tests: random weights"})
    return path


@pytest.fixture
def gate_open(monkeypatch):
    """Every adapter passes the do-no-harm gate.

    The tiny random models of these tests are judged by the gate by chance; tests
    of what happens *after* adaptation need the adapter kept. The gate itself is
    tested with the shipped model (tests/test_objectives.py).
    """
    import napari_convlora.adapt as adapt_module

    monkeypatch.setattr(adapt_module, "accepted", lambda *args: True)


def drive(generator) -> tuple[list, object]:
    """Run a report generator of the core or the widget's jobs to its end: (its reports, its return value)."""
    reports = []
    while True:
        try:
            reports.append(next(generator))
        except StopIteration as stop:
            return reports, stop.value


def with_scanner_reference(model_file: Path, out: Path, volume: Volume) -> Path:
    """A copy of ``model_file`` at ``out`` with a scanner reference learnt from ``volume`` as it is (two slice
    sets of it as two "heads"): the curve, the ``scanner-reference`` objective and auto's distance rule read it."""
    from napari_convlora.geometry import plan, select_slices
    from napari_convlora.scanner_reference import METADATA_KEY as REFERENCE_KEY
    from napari_convlora.scanner_reference import feature_moments, learn_reference

    model = load_model(model_file)
    geometry, scaled = plan(volume, model.intensity_scaling)
    stack = geometry.to_model(scaled)
    sets = [torch.from_numpy(stack[select_slices(stack, n)][:, None].copy()) for n in (10, 12)]
    moments = [feature_moments(model.unet, images) for images in sets]
    model.metadata[REFERENCE_KEY] = learn_reference(moments, ["ten", "twelve"]).as_metadata()
    save_model(model, out)
    return out
