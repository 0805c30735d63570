"""Simulated scanner profiles: scanner-like domain shift applied to real anatomy.

We cannot ship CC359, the paper's multi-scanner data set, so each *simulated*
profile below imitates one of its six domains (GE, Philips, Siemens at 1.5 T and
3 T) by a physics-inspired chain applied to a real head:

1. tissue contrast: a piecewise-linear map of normalised intensity that keeps
   the T1 order CSF < grey < white matter on every T1 profile but changes how far
   apart they sit and how bright fat and marrow are (dark when fat-suppressed),
   so the grey/white/CSF/fat/skull contrast really changes. Its control points sit at the tissue peaks of the
   shared Colin27 head (CSF ~0.2, grey matter ~0.42, white matter ~0.55 to 0.6,
   fat/marrow 0.7 to 1); on any other head the map is carried to that head's
   own tissues (its white-matter peak, :func:`~napari_convlora.geometry.white_matter_peak`),
   so that a profile gives every head the same contrast, not one that depends
   on how bright its scalp fat happens to be;
2. resolution: Gaussian blur with a different width per axis (thicker slices),
   then resampling to the profile's stored voxel size;
3. field of view and position: the head shifted inside a larger or smaller box
   (with more or less of the neck below it) and pitched by a few degrees, as
   heads are positioned in a coil;
4. a smooth multiplicative bias field (stronger at 3 T);
5. Rician noise (lower SNR at 1.5 T);
6. the stored file's orientation (axis order and flips) and integer type.

The brain mask goes through the same geometric steps only (never intensity),
so it stays the reference for the simulated volume. The profiles are modelled
on the published character of those scanners, not measured from them: they are
*simulated* domains, and every place a user sees them says so. One more profile,
``stress-inverted``, makes CSF brighter than grey matter: no T1 scanner does
that, so it is flagged ``stress`` and kept out of every headline average.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from .errors import InputError
from .geometry import scale_intensity, to_ras_order, white_matter_peak
from .nifti import Volume


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    contrast: tuple[tuple[float, float], ...]  # (input, output) control points of the intensity map on [0, 1]
    blur_mm: tuple[float, float, float]  # Gaussian sigma per RAS axis, before resampling
    voxel_mm: tuple[float, float, float]  # stored voxel size per RAS axis
    axcodes: str  # stored orientation
    bias: float  # standard deviation of the log bias field
    snr: float  # white-matter intensity over the noise sigma
    fov_shift_mm: tuple[float, float, float]  # where the head sits in the stored box
    fov_margin_mm: tuple[float, float, float]  # extra (positive) or less (negative) field of view per axis
    tilt_deg: float = 0.0  # head pitch (rotation about the left-right axis) inside the box, as positioned
    stress: bool = False  # not a plausible T1: a stress test, never in a headline average


_IDENTITY = ((0.0, 0.0), (1.0, 1.0))

# Control points are placed at the tissue peaks of a real T1 head after `scale_intensity`
# (measured on the shared Colin27 head): CSF ~0.2, grey matter ~0.42, white matter ~0.55,
# scalp fat and marrow 0.7 to 1.0. Every T1 profile keeps CSF < grey < white matter, as every
# T1-weighted sequence does (IR-prepared gradient echo, spin echo, fat-suppressed or not); what
# varies between vendors and field strengths is how far apart the tissues sit (grey/white
# contrast is lower at 1.5 T and in spin-echo-like looks), how bright fat and marrow are (dark
# with fat suppression), the receive-coil bias (stronger with 3 T multi-channel coils), noise,
# resolution, slice thickness, how the head is tilted and where the box ends (neck included or not).
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "ge-3t",
            "simulated GE 3 T (the source domain): 1 mm isotropic, mild bias field, high SNR",
            _IDENTITY,
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            "RAS",
            0.10,
            40.0,
            (0, 0, 0),
            (0, 0, 0),
        ),
        Profile(
            "ge-1.5t",
            "simulated GE 1.5 T: flat grey/white contrast, CSF closer to grey matter, dull fat, noisy, "
            "1.2 mm slices, head pitched 8 degrees",
            ((0.0, 0.0), (0.2, 0.32), (0.42, 0.46), (0.55, 0.54), (0.75, 0.58), (1.0, 0.66)),
            (0.6, 0.3, 0.3),
            (1.2, 1.0, 1.0),
            "LAS",
            0.08,
            12.0,
            (0, -6, 4),
            (10, 10, 20),
            tilt_deg=8.0,
        ),
        Profile(
            "philips-1.5t",
            "simulated Philips 1.5 T: fat-suppressed look (scalp and marrow darker than grey matter), low SNR",
            ((0.0, 0.0), (0.2, 0.18), (0.42, 0.45), (0.55, 0.62), (0.68, 0.38), (1.0, 0.22)),
            (0.3, 0.6, 0.3),
            (1.0, 1.2, 1.0),
            "LPS",
            0.10,
            12.0,
            (3, 8, -6),
            (0, 20, 30),
            tilt_deg=-6.0,
        ),
        Profile(
            "philips-3t",
            "simulated Philips 3 T: strong coil bias field, high grey/white contrast, bright fat, 0.9 mm, "
            "field of view 40 mm further down the neck, head pitched 12 degrees",
            ((0.0, 0.0), (0.2, 0.1), (0.42, 0.34), (0.55, 0.68), (0.8, 0.95), (1.0, 1.0)),
            (0.3, 0.3, 0.3),
            (0.9, 0.9, 0.9),
            "PIL",
            0.35,
            30.0,
            (-4, 10, -20),
            (20, 20, 40),
            tilt_deg=12.0,
        ),
        Profile(
            "siemens-1.5t",
            "simulated Siemens 1.5 T: thick 3 mm axial slices, low contrast, noisy",
            ((0.0, 0.0), (0.2, 0.3), (0.42, 0.5), (0.55, 0.6), (1.0, 0.8)),
            (0.3, 0.3, 1.8),
            (1.0, 1.0, 3.0),
            "ASL",
            0.12,
            10.0,
            (0, -10, 8),
            (-10, 0, 10),
        ),
        Profile(
            "siemens-3t",
            "simulated Siemens 3 T MPRAGE: crisp grey/white contrast, dark CSF, marrow darker than fat, "
            "moderate bias, head pitched -15 degrees",
            ((0.0, 0.0), (0.2, 0.08), (0.42, 0.38), (0.55, 0.74), (0.8, 0.8), (1.0, 0.85)),
            (0.2, 0.2, 0.2),
            (1.0, 1.0, 1.0),
            "RPI",
            0.22,
            28.0,
            (2, 4, -4),
            (10, 0, 0),
            tilt_deg=-15.0,
        ),
        Profile(
            "stress-inverted",
            "simulated NON-T1 stress test: CSF brighter than grey matter (no T1 scanner does this), "
            "strong bias; kept out of every headline average",
            ((0.0, 0.0), (0.2, 0.52), (0.42, 0.4), (0.55, 0.6), (0.8, 1.0), (1.0, 1.0)),
            (0.3, 0.3, 0.3),
            (0.9, 0.9, 0.9),
            "PIL",
            0.35,
            30.0,
            (-4, 10, -10),
            (20, 20, 40),
            stress=True,
        ),
    )
}
SOURCE_PROFILE = "ge-3t"
# white_matter_peak() of the shared Colin27 head, on which the control points above were placed.
REFERENCE_WHITE_MATTER = 0.604


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def _target_grid(volume: Volume, profile: Profile, ras_spacing: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the stored simulated file (orientation, voxel size, field of view)."""
    extent = to_ras_order(volume.data.shape, volume.affine) * ras_spacing + np.asarray(profile.fov_margin_mm)
    voxel = np.asarray(profile.voxel_mm)
    n_ras = np.maximum(np.round(extent / voxel).astype(int), 8)
    # World coordinates of the source box centre, then a RAS-aligned target box around it, shifted.
    centre_vox = (np.array(volume.data.shape) - 1) / 2
    centre = volume.affine[:3, :3] @ centre_vox + volume.affine[:3, 3] + np.asarray(profile.fov_shift_mm)
    target_ornt = orientations.axcodes2ornt(tuple(profile.axcodes))
    shape, columns = [0, 0, 0], np.zeros((3, 3))
    for file_axis, (ras_axis, flip) in enumerate(target_ornt):
        ras_axis = int(ras_axis)
        shape[file_axis] = int(n_ras[ras_axis])
        columns[ras_axis, file_axis] = flip * voxel[ras_axis]
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = centre - columns @ ((np.array(shape) - 1) / 2)
    return tuple(shape), affine


def _tilt(degrees: float, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World-to-world map that pitches the head by ``degrees`` about the left-right axis through the box centre.

    Applied to target world points it gives where they were in the source head, so
    the head appears rotated by ``degrees`` (nose up for positive) in the stored box.
    """
    theta = np.deg2rad(degrees)
    rotation = np.array(
        [[1.0, 0.0, 0.0], [0.0, np.cos(theta), -np.sin(theta)], [0.0, np.sin(theta), np.cos(theta)]]
    ).T  # inverse of the rotation applied to the head
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre
    return out


def _intensity_map(x: np.ndarray, points: tuple[tuple[float, float], ...], white_matter: float) -> np.ndarray:
    """The profile's contrast map carried to this head: rescale to the reference head, map, scale back.

    Dividing by the head's white-matter level puts each tissue where the control
    points expect it (tissue at t times white matter goes to t times the
    reference's white matter, whatever the head's scalp fat did to the scale);
    multiplying back keeps the head's own overall brightness, so the source
    profile's identity map leaves the head as it is.
    """
    xs, ys = zip(*points, strict=True)
    factor = REFERENCE_WHITE_MATTER / white_matter
    return (np.interp(x * factor, xs, ys) / factor).astype(np.float32)


def _bias_field(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """exp of a 4x4x4 Gaussian field, cubic-spline zoomed to ``shape``.

    The 3D spline zoom is a tensor product of 1D linear maps, so it is done as one
    (size x 4) matrix per axis (the zoom of each unit vector) and an einsum: the
    same field as ``ndimage.zoom(coarse, ..., order=3)`` to 1e-15, 13x faster
    (0.45 s instead of 6 s on a head), which is most of what the napari sample's
    twin costs on the GUI thread.
    """
    coarse = rng.normal(0.0, strength, (4, 4, 4))
    axes = [ndimage.zoom(np.eye(4), (size / 4, 1), order=3, mode="nearest")[:size] for size in shape]
    return np.exp(np.einsum("ia,jb,kc,abc->ijk", *axes, coarse, optimize=True))


def simulate(volume: Volume, mask: Volume | None, profile_name: str, seed: int = 0) -> tuple[Volume, Volume | None]:
    """The volume (and its mask, geometry only) as the simulated scanner would have stored it."""
    profile = get_profile(profile_name)
    if mask is not None and (mask.data.shape != volume.data.shape or not np.allclose(mask.affine, volume.affine)):
        raise InputError(f"{mask.path}: the mask is not on the voxel grid of {volume.path}")
    rng = np.random.default_rng([seed, zlib.crc32(profile.name.encode())])
    spacing = np.asarray(volume.spacing)
    scaled = scale_intensity(volume.data)
    white_matter = float(np.clip(white_matter_peak(scaled), 0.05, 0.95))
    image = _intensity_map(scaled, profile.contrast, white_matter)
    ornt = orientations.io_orientation(volume.affine)
    sigma_vox = [0.0, 0.0, 0.0]
    for file_axis, (ras_axis, _) in enumerate(ornt):
        sigma_vox[file_axis] = profile.blur_mm[int(ras_axis)] / spacing[file_axis]
    if any(s > 0 for s in sigma_vox):
        image = ndimage.gaussian_filter(image, sigma_vox)
    shape, affine = _target_grid(volume, profile, to_ras_order(spacing, volume.affine))
    # target voxel -> source voxel: inv(A_src) @ (head tilt about the box centre) @ A_tgt
    to_source = np.linalg.inv(volume.affine) @ _tilt(profile.tilt_deg, affine, shape) @ affine
    resampled = ndimage.affine_transform(
        image, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=1, mode="constant", cval=0.0
    )
    resampled *= _bias_field(shape, profile.bias, rng)
    sigma = float(_intensity_map(np.float32(white_matter), profile.contrast, white_matter)) / profile.snr
    noisy = np.sqrt((resampled + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    stored = np.round(np.clip(noisy, 0, None) * 1000).astype(np.int16)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    out_img = nib.Nifti1Image(stored, affine, header)
    out_img.header.set_qform(affine, code=1)
    out_img.header.set_sform(affine, code=1)
    out = Volume(stored, affine, out_img.header, None)
    if mask is None:
        return out, None
    warped = ndimage.affine_transform(
        mask.data.astype(np.float32), to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=1, cval=0.0
    )
    mask_img = nib.Nifti1Image((warped > 0.5).astype(np.uint8), affine)
    mask_img.header.set_qform(affine, code=1)
    mask_img.header.set_sform(affine, code=1)
    return out, Volume(np.asarray(mask_img.dataobj), affine, mask_img.header, None)
