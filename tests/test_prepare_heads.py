"""scripts/prepare_heads.py: the label rule and the review picture (the downloads need the registries)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_heads.py"


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_heads", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _save(folder: Path, name: str, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), folder / name)


def _head(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    t1 = np.zeros((20, 20, 20), np.float32)
    t1[4:16, 4:16, 4:16] = 100.0
    _save(folder, "t1.nii.gz", t1)
    deepbet = np.zeros(t1.shape, np.uint8)
    deepbet[5:15, 5:15, 5:15] = 1
    hdbet = deepbet.copy()
    hdbet[5:15, 5:15, 15] = 1  # one more plane
    _save(folder, "mask_deepbet.nii.gz", deepbet)
    _save(folder, "mask_hdbet.nii.gz", hdbet)
    return deepbet, hdbet


def _consensus(folder: Path) -> np.ndarray:
    return np.asanyarray(nib.load(folder / "mask_consensus.nii.gz").dataobj)


def test_without_a_shipped_mask_the_label_is_hdbet_and_the_disagreement_is_recorded(prepare, tmp_path):
    _, hdbet = _head(tmp_path)
    figures = prepare.label(tmp_path)
    np.testing.assert_array_equal(_consensus(tmp_path), hdbet)
    assert figures["peers_disagree_ml"] == pytest.approx(100 * 0.008)  # 100 voxels of 8 mm^3
    assert figures["dice_hdbet_consensus"] == 1.0 and figures["dice_deepbet_hdbet"] < 1.0


def test_with_a_shipped_mask_the_label_is_the_majority_of_three(prepare, tmp_path):
    deepbet, _ = _head(tmp_path)
    ref = deepbet.copy()
    ref[5:15, 5:15, 4] = 1  # the shipped mask alone claims this plane
    _save(tmp_path, "mask_ref.nii.gz", ref)
    prepare.label(tmp_path)
    consensus = _consensus(tmp_path)
    np.testing.assert_array_equal(consensus, deepbet)  # each extra plane has one vote of three
    prepare.review_png(tmp_path)
    assert (tmp_path / "review.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_source_names_its_licence_and_kind(prepare):
    names = [s.name for s in prepare.SOURCES]
    assert len(names) == len(set(names))
    for source in prepare.SOURCES:
        assert source.kind in ("person", "template") and source.licence
        assert source.package.startswith(("pypi:", "debian:"))
        assert source.mask_from is None or source.mask_from in names
