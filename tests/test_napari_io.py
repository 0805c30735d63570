"""Reader, writer and sample data of the napari plugin (no viewer needed)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_convlora._napari import sample
from napari_convlora._napari.layers import AFFINE_KEY, HEADER_KEY
from napari_convlora._napari.reader import napari_get_reader
from napari_convlora._napari.writer import write_image, write_labels

from .conftest import SAMPLE_MASK, SAMPLE_T1


def _head(tmp_path, axcodes: str, spacing=(1.2, 1.0, 0.8)):
    """A small real head (sample cropped) stored with ``axcodes`` orientation and anisotropic voxels."""
    img = nib.load(str(SAMPLE_T1))
    data = np.asarray(img.dataobj)[40:140:4, 50:170:4, 30:150:4].astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-30.0, -40.0, -20.0)
    if axcodes == "LAS":
        affine[0, 0] = -affine[0, 0]
        affine[0, 3] = 30.0
    out = nib.Nifti1Image(data, affine)
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    path = tmp_path / f"head_{axcodes}.nii.gz"
    nib.save(out, str(path))
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    return path, data, affine


def test_reader_refuses_what_it_cannot_read(tmp_path):
    assert napari_get_reader(str(tmp_path / "image.tif")) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    (tmp_path / "text.nii").write_text("not a nifti file")
    assert napari_get_reader(str(tmp_path / "text.nii")) is None
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(SAMPLE_T1.read_bytes())[:5000])
    assert napari_get_reader(str(truncated)) is None
    constant = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(constant))
    assert napari_get_reader(str(constant)) is None
    assert napari_get_reader([str(SAMPLE_T1), str(tmp_path / "text.nii")]) is None


def test_reader_image_and_mask_layers():
    reader = napari_get_reader(str(SAMPLE_T1))
    ((data, kwargs, kind),) = reader(str(SAMPLE_T1))
    assert kind == "image" and data.shape == (181, 217, 181)
    assert kwargs["name"] == "colin27_t1" and kwargs["scale"] == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(kwargs["metadata"][AFFINE_KEY], nib.load(str(SAMPLE_T1)).affine)
    assert isinstance(kwargs["metadata"][HEADER_KEY], nib.Nifti1Header)
    ((mask, _mask_kwargs, mask_kind),) = napari_get_reader(str(SAMPLE_MASK))(str(SAMPLE_MASK))
    assert mask_kind == "labels" and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    both = napari_get_reader([str(SAMPLE_T1), str(SAMPLE_MASK)])([str(SAMPLE_T1), str(SAMPLE_MASK)])
    assert [layer[2] for layer in both] == ["image", "labels"]


@pytest.mark.parametrize("axcodes", ["RAS", "LAS"])
def test_round_trip_keeps_the_grid(tmp_path, axcodes):
    path, data, _ = _head(tmp_path, axcodes)
    affine = nib.load(str(path)).affine  # as stored (float32 in the header)
    ((image, kwargs, kind),) = napari_get_reader(str(path))(str(path))
    assert kind == "image"
    np.testing.assert_allclose(kwargs["scale"], (1.2, 1.0, 0.8))  # voxel sizes along the axes napari shows
    attributes = {"metadata": kwargs["metadata"], "scale": kwargs["scale"], "translate": (0, 0, 0)}
    mask = (image > np.percentile(image, 60)).astype(np.uint8)
    out = tmp_path / "mask.nii.gz"
    assert write_labels(str(out), mask, attributes) == [str(out)]
    written = nib.load(str(out))
    np.testing.assert_array_equal(written.affine, affine)
    assert "".join(nib.aff2axcodes(written.affine)) == axcodes
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    ((again, _again_kwargs, again_kind),) = napari_get_reader(str(out))(str(out))
    assert again_kind == "labels"
    np.testing.assert_array_equal(again, mask)
    image_out = tmp_path / "image.nii"
    write_image(str(image_out), image, attributes)
    np.testing.assert_array_equal(np.asarray(nib.load(str(image_out)).dataobj), data)
    np.testing.assert_array_equal(nib.load(str(image_out)).affine, affine)


def test_writer_without_nifti_metadata_uses_scale_and_translate(tmp_path):
    labels = np.zeros((5, 6, 7), np.int32)
    labels[1:3, 2:4, 3:5] = 300  # more than uint8 holds: kept, as uint16
    out = tmp_path / "painted"
    (written,) = write_labels(str(out), labels, {"metadata": {}, "scale": (2.0, 3.0, 4.0), "translate": (1, 2, 3)})
    assert written.endswith(".nii.gz")
    img = nib.load(written)
    np.testing.assert_array_equal(img.affine[:3, :3], np.diag([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(img.affine[:3, 3], [1, 2, 3])
    assert img.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    with pytest.raises(ValueError, match="3D"):
        write_labels(str(tmp_path / "flat.nii.gz"), np.zeros((4, 4), np.uint8), {"metadata": {}})


def test_sample_data():
    ((head, _head_kwargs, kind),) = sample.sample_head()
    assert kind == "image" and head.shape == (181, 217, 181)
    ((mask, _, mask_kind),) = sample.sample_mask()
    assert mask_kind == "labels" and mask.shape == head.shape
    (scan, scan_kwargs, scan_kind), (twin_mask, twin_kwargs, twin_mask_kind) = sample.sample_twin()
    assert (scan_kind, twin_mask_kind) == ("image", "labels")
    assert scan.shape == twin_mask.shape and scan.shape != head.shape
    np.testing.assert_allclose(scan_kwargs["scale"], (0.9, 0.9, 0.9))
    np.testing.assert_array_equal(scan_kwargs["metadata"][AFFINE_KEY], twin_kwargs["metadata"][AFFINE_KEY])
    assert 0.05 < twin_mask.mean() < 0.5
