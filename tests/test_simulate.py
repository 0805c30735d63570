"""Simulated scanner profiles: deterministic, each one changes the image, masks only follow the geometry."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.geometry import scale_intensity, white_matter_peak
from napari_convlora.nifti import Volume, load_mask, load_volume
from napari_convlora.simulate import PROFILES, REFERENCE_WHITE_MATTER, SOURCE_PROFILE, simulate


@pytest.fixture(scope="module")
def head(small_path, small_mask_path):
    return load_volume(small_path), load_mask(small_mask_path)


@pytest.fixture(scope="module")
def simulated(head):
    volume, mask = head
    return {name: simulate(volume, mask, name, seed=0) for name in PROFILES}


def test_six_documented_profiles_with_a_source():
    assert len(PROFILES) >= 6 and SOURCE_PROFILE in PROFILES
    assert all("simulated" in p.description for p in PROFILES.values())


def _at(profile, x):
    xs, ys = zip(*profile.contrast, strict=True)
    return float(np.interp(x, xs, ys))


def test_every_t1_profile_keeps_the_t1_tissue_order_and_contrast_really_changes():
    """CSF < grey < white matter on every T1 profile; grey/white contrast and fat vary; the stress one is flagged."""
    source = PROFILES[SOURCE_PROFILE].contrast
    assert source == ((0.0, 0.0), (1.0, 1.0))
    csf, grey, white, fat = 0.2, 0.42, 0.55, 0.8
    t1 = [p for p in PROFILES.values() if not p.stress]
    for p in t1:
        assert _at(p, csf) < _at(p, grey) < _at(p, white), p.name
    contrasts = {round(_at(p, white) / _at(p, grey), 2) for p in t1}
    assert len(contrasts) >= 4, contrasts
    assert any(_at(p, fat) < _at(p, grey) for p in t1), "no fat-suppressed look"
    stress = [p for p in PROFILES.values() if p.stress]
    assert stress and all(_at(p, csf) > _at(p, grey) and "NON-T1" in p.description for p in stress)
    assert not PROFILES[SOURCE_PROFILE].stress


def _pitch_deg(mask):
    """Angle of the brain's long axis in the sagittal (A-S) plane, in world coordinates."""
    ijk = np.argwhere(mask.data > 0)
    world = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    ys = world[:, 1:] - world[:, 1:].mean(axis=0)
    _, vectors = np.linalg.eigh(ys.T @ ys)
    y, z = vectors[:, -1]
    return float(np.degrees(np.arctan2(z, y) if y > 0 else np.arctan2(-z, -y)))


def test_tilt_pitches_the_head_in_the_box(head, monkeypatch):
    volume, mask = head
    level = dataclasses.replace(PROFILES[SOURCE_PROFILE], name="level")
    tilted = dataclasses.replace(level, name="tilted", tilt_deg=20.0)
    monkeypatch.setitem(PROFILES, "level", level)
    monkeypatch.setitem(PROFILES, "tilted", tilted)
    _, flat_mask = simulate(volume, mask, "level", seed=0)
    _, tilted_mask = simulate(volume, mask, "tilted", seed=0)
    assert _pitch_deg(tilted_mask) - _pitch_deg(flat_mask) == pytest.approx(20.0, abs=2.0)
    assert tilted_mask.data.sum() == pytest.approx(flat_mask.data.sum(), rel=0.03)


def test_deterministic_for_a_seed(head, simulated):
    volume, mask = head
    again, _ = simulate(volume, mask, "philips-3t", seed=0)
    np.testing.assert_array_equal(again.data, simulated["philips-3t"][0].data)
    other, _ = simulate(volume, mask, "philips-3t", seed=1)
    assert not np.array_equal(other.data, again.data)


def test_every_profile_gives_a_different_scan(simulated):
    names = list(simulated)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            va, vb = simulated[a][0], simulated[b][0]
            assert va.data.shape != vb.data.shape or not np.allclose(va.data, vb.data, atol=50), (a, b)
    # Orientation and voxel size of the stored file differ between profiles, as between scanners.
    assert len({nib.aff2axcodes(v.affine) for v, _ in simulated.values()}) >= 4
    assert len({tuple(np.round(v.spacing, 2)) for v, _ in simulated.values()}) >= 3


def test_masks_follow_the_geometry_only(head, simulated):
    mask = head[1]
    brain_ml = mask.data.sum() * np.prod(mask.spacing) / 1000
    for name, (sim, sim_mask) in simulated.items():
        assert sim_mask.data.shape == sim.data.shape and np.allclose(sim_mask.affine, sim.affine)
        assert set(np.unique(sim_mask.data)) <= {0, 1}
        ml = sim_mask.data.sum() * np.prod(sim_mask.spacing) / 1000
        assert abs(ml - brain_ml) / brain_ml < 0.05, name  # same brain, resampled
        # The brain is brighter than the background in every simulated scan.
        assert sim.data[sim_mask.data > 0].mean() > 2 * sim.data[sim_mask.data == 0].mean(), name


def test_a_profile_gives_every_head_the_same_contrast(head):
    """A head whose bright fat is dimmed sits higher on the scaled range; its tissues must still get the same map.

    Before the map was carried to each head's white matter, the same profile gave
    such a head a grey/white ratio of 1.38 where the original got 0.88 (philips-1.5t).
    """
    volume, mask = head
    raw, brain = volume.data.astype(np.float32), mask.data > 0
    top = np.percentile(raw[brain], 99.5)
    dim_fat = Volume(np.where(raw > top, top + 0.3 * (raw - top), raw), volume.affine, volume.header, None)
    scaled = scale_intensity(raw)
    assert white_matter_peak(scale_intensity(dim_fat.data)) > 1.25 * white_matter_peak(scaled)
    relative = scaled / white_matter_peak(scaled)
    grey = Volume((brain & (relative > 0.7) & (relative < 0.8)).astype(np.uint8), volume.affine, volume.header, None)
    white = Volume((brain & (relative > 0.9) & (relative < 1.0)).astype(np.uint8), volume.affine, volume.header, None)
    for name in ("philips-1.5t", "siemens-3t"):
        ratios = []
        for head_volume in (volume, dim_fat):
            scan, grey_there = simulate(head_volume, grey, name, seed=0)
            _, white_there = simulate(head_volume, white, name, seed=0)
            ratios.append(scan.data[grey_there.data > 0].mean() / scan.data[white_there.data > 0].mean())
        assert ratios[0] == pytest.approx(ratios[1], abs=0.02), name


def test_reference_white_matter_is_the_sample_heads(sample_img):
    """The control points were placed on Colin27 (the bundled sample): its map is the profile's own."""
    scaled = scale_intensity(np.asarray(sample_img.dataobj, dtype=np.float32))
    assert white_matter_peak(scaled) == pytest.approx(REFERENCE_WHITE_MATTER, abs=0.005)


def test_unknown_profile_is_refused(head):
    with pytest.raises(InputError, match="unknown profile"):
        simulate(head[0], None, "toshiba-7t")


def test_cli_simulate_and_profiles(capsys, tmp_path, small_path, small_mask_path):
    code = main(["profiles", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert code == 0 and [p["name"] for p in listed["profiles"]] == list(PROFILES)
    out, out_mask = tmp_path / "sim.nii.gz", tmp_path / "sim_mask.nii.gz"
    code = main(
        [
            "simulate",
            str(small_path),
            "-o",
            str(out),
            "--profile",
            "siemens-1.5t",
            "--mask",
            str(small_mask_path),
            "--mask-output",
            str(out_mask),
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["simulated"] is True
    sim, sim_mask = load_volume(out), load_mask(out_mask)
    assert sim.data.shape == sim_mask.data.shape and nib.aff2axcodes(sim.affine) == ("A", "S", "L")
    code = main(["simulate", str(small_path), "-o", str(out), "--profile", "nope"])
    assert code == 2 and "unknown profile" in capsys.readouterr().err
