"""Reading volumes, mapping them to the model's slices and back onto the file's exact grid."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from napari_convlora.errors import InputError
from napari_convlora.geometry import TISSUE_LEVEL, plan, scale_intensity, tissue_level
from napari_convlora.metrics import dice
from napari_convlora.nifti import load_mask, load_volume, save_mask

from .conftest import SAMPLE_MASK, SAMPLE_T1


def _las(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same head stored left-to-right flipped (LAS), affine adjusted: same world positions."""
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    return nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip)


def _roundtrip(volume, mask: np.ndarray) -> np.ndarray:
    geometry, _ = plan(volume)
    stack = geometry.to_model(geometry.to_ras(mask).astype(np.float32))
    return (geometry.from_model(stack) > 0.5).astype(np.uint8)


def test_ras_roundtrip_is_exact():
    volume, mask = load_volume(SAMPLE_T1), load_mask(SAMPLE_MASK)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(_roundtrip(volume, mask.data), mask.data)


def test_las_roundtrip_is_exact_and_slices_match_ras(tmp_path):
    t1, m = nib.load(str(SAMPLE_T1)), nib.load(str(SAMPLE_MASK))
    nib.save(_las(t1), str(tmp_path / "las.nii.gz"))
    nib.save(_las(m), str(tmp_path / "las_mask.nii.gz"))
    volume, mask = load_volume(tmp_path / "las.nii.gz"), load_mask(tmp_path / "las_mask.nii.gz")
    assert nib.aff2axcodes(volume.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(_roundtrip(volume, mask.data), mask.data)
    # The model sees the same slices whatever the storage order.
    g_las, s_las = plan(volume)
    g_ras, s_ras = plan(load_volume(SAMPLE_T1))
    np.testing.assert_array_equal(g_las.to_model(s_las), g_ras.to_model(s_ras))


@pytest.mark.parametrize("axcodes", [("P", "S", "R"), ("A", "S", "L"), ("I", "R", "A")])
def test_permuted_orientations_roundtrip_exactly(tmp_path, axcodes):
    t1, m = nib.load(str(SAMPLE_T1)), nib.load(str(SAMPLE_MASK))
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(t1.affine), nib.orientations.axcodes2ornt(axcodes)
    )
    for img, name in ((t1, "t1.nii.gz"), (m, "mask.nii.gz")):
        nib.save(img.as_reoriented(transform), str(tmp_path / name))
    volume, mask = load_volume(tmp_path / "t1.nii.gz"), load_mask(tmp_path / "mask.nii.gz")
    assert nib.aff2axcodes(volume.affine) == axcodes
    np.testing.assert_array_equal(_roundtrip(volume, mask.data), mask.data)
    g_ras, s_ras = plan(load_volume(SAMPLE_T1))
    g, s = plan(volume)
    np.testing.assert_array_equal(g.to_model(s), g_ras.to_model(s_ras))


def test_anisotropic_1p5mm_roundtrip(tmp_path):
    t1, m = nib.load(str(SAMPLE_T1)), nib.load(str(SAMPLE_MASK))
    target = (tuple(round(n / 1.5) for n in t1.shape), t1.affine @ np.diag([1.5, 1.5, 1.5, 1.0]))
    nib.save(resample_from_to(t1, target, order=1), str(tmp_path / "t1_15.nii.gz"))
    nib.save(resample_from_to(m, target, order=0), str(tmp_path / "m_15.nii.gz"))
    volume, mask = load_volume(tmp_path / "t1_15.nii.gz"), load_mask(tmp_path / "m_15.nii.gz")
    geometry, _ = plan(volume)
    assert geometry.plane_spacing == pytest.approx((1.0, 1.0), abs=0.01)  # resampled in-plane to 1 mm
    assert geometry.plane_shape != geometry.ras_shape[1:]
    back = _roundtrip(volume, mask.data)
    assert back.shape == mask.data.shape
    assert dice(mask.data, back) > 0.99


def test_save_mask_keeps_grid_affine_and_header(tmp_path):
    t1 = nib.load(str(SAMPLE_T1))
    nib.save(_las(t1), str(tmp_path / "las.nii.gz"))
    volume = load_volume(tmp_path / "las.nii.gz")
    mask = (volume.data > 80).astype(np.uint8)
    out = save_mask(mask, volume, tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    np.testing.assert_allclose(written.affine, volume.affine)
    assert written.header["qform_code"] == volume.header["qform_code"]
    assert written.header["sform_code"] == volume.header["sform_code"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["las.nii.gz", "mask.nii.gz"]  # no temporary left
    with pytest.raises(InputError, match="already exists"):
        save_mask(mask, volume, out)
    save_mask(1 - mask, volume, out, overwrite=True)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), 1 - mask)


def test_scaling_ignores_a_hot_voxel():
    volume = load_volume(SAMPLE_T1)
    data = volume.data.astype(np.float32)
    hot = data.copy()
    hot[90, 100, 90] = 1e6
    a, b = scale_intensity(data), scale_intensity(hot)
    assert a.min() == 0.0 and a.max() == 1.0
    b[90, 100, 90] = a[90, 100, 90]
    assert np.abs(a - b).max() < 0.02  # one bright voxel does not squash everything else


def test_tissue_scaling_puts_tissue_at_one_level_whatever_the_fat():
    """Percentile scaling lets scalp fat set the top, so a head with dimmer fat shows its brain higher;
    tissue scaling puts both brains at the same level."""
    volume, mask = load_volume(SAMPLE_T1), load_mask(SAMPLE_MASK)
    raw, brain = volume.data.astype(np.float32), mask.data > 0
    top = np.percentile(raw[brain], 99.5)
    dim_fat = np.where(raw > top, top + 0.3 * (raw - top), raw)
    legacy = [np.median(scale_intensity(v)[brain]) for v in (raw, dim_fat)]
    assert legacy[1] > 1.25 * legacy[0]
    tissue = [np.median(scale_intensity(v, "tissue")[brain]) for v in (raw, dim_fat)]
    assert tissue[0] == pytest.approx(tissue[1], abs=0.01)
    assert tissue_level(scale_intensity(raw, "tissue")) == pytest.approx(TISSUE_LEVEL, abs=0.01)
    with pytest.raises(ValueError, match="unknown intensity scaling"):
        scale_intensity(raw, "z-score")


def test_disk_index_maps_to_the_same_model_slice(tmp_path):
    t1 = nib.load(str(SAMPLE_T1))
    nib.save(_las(t1), str(tmp_path / "las.nii.gz"))
    g_ras, _ = plan(load_volume(SAMPLE_T1))
    g_las, _ = plan(load_volume(tmp_path / "las.nii.gz"))
    assert g_ras.disk_to_model_slice((60, 100, 90)) == g_las.disk_to_model_slice((180 - 60, 100, 90))


# --- bad input -------------------------------------------------------------------------------


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _patch_pixdim(src, dst, axis: int, value: float):
    raw = bytearray(open(src, "rb").read())
    struct.pack_into("<f", raw, 76 + 4 * axis, value)
    open(dst, "wb").write(bytes(raw))
    return dst


def test_refuses_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_volume(tmp_path / "absent.nii.gz")


def test_refuses_a_file_that_is_not_nifti(tmp_path):
    (tmp_path / "notes.nii.gz").write_bytes(gzip.compress(b"this is not an image" * 50))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(InputError, match=r"notes\.nii\.gz"):
        load_volume(tmp_path / "notes.nii.gz")
    with pytest.raises(InputError, match="not a NIfTI file"):
        load_volume(tmp_path / "image.png")


def test_refuses_truncated_gzip(tmp_path):
    raw = SAMPLE_T1.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_volume(tmp_path / "cut.nii.gz")


def test_refuses_2d_and_real_4d_but_takes_a_single_volume_4d(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="2D"):
        load_volume(_write(tmp_path / "flat.nii", rng.random((20, 20)).astype(np.float32)))
    with pytest.raises(InputError, match="4D series of 3 volumes"):
        load_volume(_write(tmp_path / "series.nii", rng.random((10, 10, 10, 3)).astype(np.float32)))
    single = load_volume(_write(tmp_path / "one.nii", rng.random((10, 10, 10, 1)).astype(np.float32)))
    assert single.data.shape == (10, 10, 10)


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf])
def test_refuses_non_finite_or_constant_voxels(tmp_path, value):
    data = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    if value == 0.0:
        data[:] = 0.0
        match = "constant"
    else:
        data[3, 3, 3] = value
        match = "NaN or Inf"
    with pytest.raises(InputError, match=match):
        load_volume(_write(tmp_path / "bad.nii", data))


def test_refuses_broken_headers_and_odd_voxel_types(tmp_path):
    good = _write(tmp_path / "good.nii", np.random.default_rng(0).random((10, 10, 10)).astype(np.float32))
    raw = bytearray(good.read_bytes())
    struct.pack_into("<f", raw, 108, 10.0)  # vox_offset inside the header
    (tmp_path / "offset.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_volume(tmp_path / "offset.nii")
    rgb = np.zeros((5, 5, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii"))
    with pytest.raises(InputError, match="unsupported voxel type"):
        load_mask(tmp_path / "rgb.nii")


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_refuses_zero_or_negative_voxel_sizes(tmp_path, value):
    good = _write(tmp_path / "good.nii", np.random.default_rng(0).random((10, 10, 10)).astype(np.float32))
    bad = _patch_pixdim(good, tmp_path / "bad.nii", axis=2, value=value)
    assert load_volume(good).data.shape == (10, 10, 10)
    with pytest.raises(InputError, match="voxel sizes must be positive"):
        load_volume(bad)


@pytest.mark.parametrize(
    "shape, target",
    [((256, 256), (230, 230)), ((120, 200), (240, 100)), ((64, 90), (128, 45)), ((97, 61), (31, 20))],
)
def test_plane_resize_equals_skimage(shape, target):
    """Ours is torch's bilinear plus skimage's own anti-aliasing; it must give what skimage's resize gives."""
    from skimage.transform import resize

    from napari_convlora.geometry import _resize_plane

    stack = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    expected = resize(stack, (3, *target), order=1, mode="edge", anti_aliasing=True, preserve_range=True)
    np.testing.assert_allclose(_resize_plane(stack, target), expected, atol=1e-4)  # float32 vs float64
