"""From a volume on disk to the model's stack of 2D sagittal slices, and back.

The model always sees the same thing whatever the file looks like: the volume
reoriented to RAS (axis permutation and flips only, never interpolation),
sagittal slices (planes of constant x), resampled in-plane to ``PLANE_SPACING_MM``,
intensities scaled robustly to [0, 1] (the way the model was trained:
:data:`INTENSITY_SCALINGS`), and cropped to the head (plus a margin)
with sides padded to a multiple of 8 for the three stride-2 downsamplings.
:class:`SliceGeometry` records every step so a prediction maps back exactly onto
the input's voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations
from scipy import ndimage
from skimage.filters import threshold_otsu

from .intensity_map import IntensityCurve
from .morphology import opening
from .nifti import Volume
from .standardize import IntensityReference, standardize

PLANE_SPACING_MM = 1.0
MULTIPLE = 8
HEAD_MARGIN_MM = 8.0
_SPACING_TOLERANCE = 0.01
_MODE_SHARE = 0.3  # a histogram mode counts as a tissue when it holds >= 30% of the tallest mode
TISSUE_LEVEL = 0.6  # where "tissue" scaling puts the head's tissue level (tissue_level)
INTENSITY_SCALINGS = {
    "percentile": "0.5th percentile to 0, 99.5th percentile of the head to 1 (models made before 2026-11-24)",
    "tissue": f"percentile scaling, then the head's tissue level (about white matter on a T1) moved to {TISSUE_LEVEL}",
}
LEGACY_SCALING = "percentile"  # what a model file that names no scaling was trained with


@dataclass(frozen=True)
class SliceGeometry:
    """How the file's voxel grid maps to the model's slice stack."""

    disk_shape: tuple[int, int, int]
    file_ornt: np.ndarray  # nibabel orientation of the file's axes (io_orientation of its affine)
    ras_shape: tuple[int, int, int]
    ras_spacing: tuple[float, float, float]
    plane_shape: tuple[int, int]  # in-plane size after resampling, before cropping
    x_range: tuple[int, int]  # sagittal slices that hold head: [x0, x1)
    crop: tuple[int, int, int, int]  # y0, y1, z0, z1 in the resampled plane (may exceed it: zero padding)

    @property
    def plane_spacing(self) -> tuple[float, float]:
        """Pixel size of the model's slices in mm (rows, columns)."""
        return tuple(
            s if n == m else s * n / m
            for s, n, m in zip(self.ras_spacing[1:], self.ras_shape[1:], self.plane_shape, strict=True)
        )

    @property
    def n_slices(self) -> int:
        return self.x_range[1] - self.x_range[0]

    def to_model(self, ras: np.ndarray, x_step: int = 1) -> np.ndarray:
        """A RAS volume (``ras_shape``) to the (n_slices, H, W) float32 stack the model reads.

        ``x_step`` > 1: every ``x_step``-th slice of that stack only (what a coarse pass reads).
        """
        x0, x1 = self.x_range
        plane = _resize_plane(ras[x0:x1:x_step].astype(np.float32, copy=False), self.plane_shape)
        y0, y1, z0, z1 = self.crop
        out = np.zeros((len(plane), y1 - y0, z1 - z0), dtype=np.float32)
        sy0, sz0 = max(y0, 0), max(z0, 0)
        sy1, sz1 = min(y1, self.plane_shape[0]), min(z1, self.plane_shape[1])
        out[:, sy0 - y0 : sy1 - y0, sz0 - z0 : sz1 - z0] = plane[:, sy0:sy1, sz0:sz1]
        return out

    def from_model(self, stack: np.ndarray) -> np.ndarray:
        """A (n_slices, H, W) stack of probabilities back to a float32 volume in file order."""
        x0, x1 = self.x_range
        y0, y1, z0, z1 = self.crop
        sy0, sz0 = max(y0, 0), max(z0, 0)
        sy1, sz1 = min(y1, self.plane_shape[0]), min(z1, self.plane_shape[1])
        inside = stack[:, sy0 - y0 : sy1 - y0, sz0 - z0 : sz1 - z0]
        ras = np.zeros(self.ras_shape, dtype=np.float32)
        if tuple(self.plane_shape) == tuple(self.ras_shape[1:]):  # slices on the file's in-plane grid: no resize
            ras[x0:x1, sy0:sy1, sz0:sz1] = inside
        else:
            plane = np.zeros((x1 - x0, *self.plane_shape), dtype=np.float32)
            plane[:, sy0:sy1, sz0:sz1] = inside
            ras[x0:x1] = _resize_plane(plane, self.ras_shape[1:])
        return self.from_ras(ras)

    def to_ras(self, disk: np.ndarray) -> np.ndarray:
        """An array in file order to RAS order (permutes and flips axes, nothing else)."""
        to = orientations.ornt_transform(self.file_ornt, orientations.axcodes2ornt("RAS"))
        return orientations.apply_orientation(disk, to)

    def from_ras(self, ras: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_ras`."""
        back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), self.file_ornt)
        return np.ascontiguousarray(orientations.apply_orientation(ras, back))

    def restricted(self, box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]) -> SliceGeometry:
        """The same slicing limited to ``box``: ((x0, x1), (y0, y1), (z0, z1)) in RAS voxels, ends exclusive.

        The in-plane crop is padded to a multiple of ``MULTIPLE`` pixels (zeros where it leaves the plane).
        """
        crop = []
        for axis, n_plane in ((1, self.plane_shape[0]), (2, self.plane_shape[1])):
            factor = n_plane / self.ras_shape[axis]
            lo, hi = int(np.floor(box[axis][0] * factor)), int(np.ceil(box[axis][1] * factor))
            crop += _pad_to_multiple(lo, hi, MULTIPLE)
        x0, x1 = max(int(box[0][0]), 0), min(int(box[0][1]), self.ras_shape[0])
        return replace(self, x_range=(x0, max(x1, x0 + 1)), crop=tuple(int(c) for c in crop))

    def model_to_ras_box(self, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
        """A box in stack coordinates (slice, row, column; ``hi`` exclusive) as a box in RAS voxels."""
        out = [(self.x_range[0] + lo[0], self.x_range[0] + hi[0])]
        for axis in (1, 2):
            factor = self.ras_shape[axis] / self.plane_shape[axis - 1]
            offset = self.crop[2 * (axis - 1)]
            out.append((int(np.floor((lo[axis] + offset) * factor)), int(np.ceil((hi[axis] + offset) * factor))))
        return tuple(out)

    def disk_to_model_slice(self, disk_index: tuple[int, int, int]) -> int:
        """Index in the model's stack of the sagittal slice through a voxel given in file order."""
        point = np.zeros(self.disk_shape, dtype=bool)
        point[tuple(disk_index)] = True
        x = int(np.argwhere(self.to_ras(point))[0, 0])
        return int(np.clip(x - self.x_range[0], 0, self.n_slices - 1))


def _resize_plane(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane resize of a (N, H, W) stack, as skimage's ``resize(order=1, mode="edge",
    anti_aliasing=...)`` does it (tested equal), about ten times faster.

    skimage's anti-aliasing is a Gaussian of sigma (factor - 1) / 2 per shrunk
    axis, kept here as it is (a sigma under 1/8 is a one-tap kernel there, so
    it is skipped); the interpolation is torch's, which uses every core.
    """
    if tuple(stack.shape[1:]) == tuple(shape):
        return stack
    sigma = [0.0] + [max((n / m - 1) / 2, 0.0) for n, m in zip(stack.shape[1:], shape, strict=True)]
    sigma = [s if int(4.0 * s + 0.5) > 0 else 0.0 for s in sigma]  # scipy's kernel radius at truncate=4
    if any(sigma):
        stack = ndimage.gaussian_filter(stack, sigma, mode="nearest")
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False)[:, 0].numpy()


def scale_intensity(ras: np.ndarray, scaling: str = LEGACY_SCALING) -> np.ndarray:
    """Map intensities to [0, 1] the way ``scaling`` (a key of :data:`INTENSITY_SCALINGS`) says.

    "percentile": the 0.5th percentile to 0 and the 99.5th percentile of the
    head to 1 (percentiles on a strided subsample, for speed, instead of
    min/max so that single hot voxels do not squash brain contrast). The top
    is set by the brightest tissue, scalp fat, so the brain lands at different
    heights on different heads (white matter at 0.60 on Colin27, 0.87 on
    MNI152): a model trained on one head has seen one intensity scale.
    "tissue" then moves :func:`tissue_level` to ``TISSUE_LEVEL``, so tissue,
    not fat, sets the scale.
    """
    if scaling not in INTENSITY_SCALINGS:
        raise ValueError(f"unknown intensity scaling {scaling!r}")
    sample = ras[::2, ::2, ::2].astype(np.float32, copy=False).ravel()
    lo = float(np.percentile(sample, 0.5))
    above = sample[sample > lo]
    hi = float(np.percentile(above, 99.5)) if above.size else lo
    if hi <= lo:
        hi = float(sample.max())
    scaled = ras.astype(np.float32, order="C")  # C order whatever the file's (NIfTI data is Fortran order):
    scaled -= lo  # every later step slices and shifts it along its first axis
    scaled /= max(hi - lo, 1e-12)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if scaling == "tissue":
        scaled *= TISSUE_LEVEL / float(np.clip(tissue_level(scaled), 0.05, 1.0))
        np.clip(scaled, 0.0, 1.0, out=scaled)
    return scaled


def tissue_level(scaled: np.ndarray) -> float:
    """The 75th percentile of the head's voxels above Otsu's threshold: about white matter on a T1.

    Chosen over :func:`white_matter_peak` for the model's input because it must
    hold on any scanner's scan: over both shared heads, real and under every
    simulated profile (seeds 0 and 1), it stayed within 0.93 to 1.10 times the
    white-matter median, where the histogram mode (exact on a clean head)
    drifted to grey matter under bias fields and noise (0.68 to 1.06).
    """
    sample = scaled[::2, ::2, ::2].ravel()
    above = sample[sample > threshold_otsu(sample)]
    return float(np.percentile(above, 75)) if above.size else float(sample.max())


def white_matter_peak(scaled: np.ndarray) -> float:
    """Where white matter sits on the ``scale_intensity`` scale of a T1 head, found without a mask.

    White matter is the brightest *large* mode of a T1 head's histogram above
    Otsu's threshold (scalp fat and marrow are brighter but far fewer voxels).
    The same tissue lands at very different places on that scale from head to
    head (0.60 on the shared Colin27, whose bright fat sets the top; 0.87 on
    the averaged MNI152), so anything defined "at a tissue" must find it first.
    Falls back to the histogram's highest bin when no mode stands out.
    """
    sample = scaled[::2, ::2, ::2].ravel()
    threshold = float(threshold_otsu(sample))
    hist, edges = np.histogram(sample[sample > threshold], bins=100, range=(threshold, 1.0))
    smooth = ndimage.gaussian_filter1d(hist.astype(float), 1.5)
    modes = [
        i
        for i in range(1, len(smooth) - 1)
        if smooth[i] >= smooth[i - 1] and smooth[i] > smooth[i + 1] and smooth[i] >= _MODE_SHARE * smooth.max()
    ]
    i = modes[-1] if modes else int(np.argmax(smooth))
    return float((edges[i] + edges[i + 1]) / 2)


def to_ras_order(per_file_axis, affine: np.ndarray) -> np.ndarray:
    """Per-axis values (voxel sizes, lengths) of a file's axes, reordered to R, A, S."""
    out = np.zeros(3)
    for file_axis, (ras_axis, _) in enumerate(orientations.io_orientation(affine)):
        out[int(ras_axis)] = per_file_axis[file_axis]
    return out


def plan(
    volume: Volume,
    scaling: str = LEGACY_SCALING,
    reference: IntensityReference | None = None,
    brain: np.ndarray | None = None,
    curve: IntensityCurve | None = None,
) -> tuple[SliceGeometry, np.ndarray]:
    """Plan the slicing of ``volume``; return the geometry and the RAS volume scaled by ``scaling``.

    With a ``reference`` the scaled volume is also standardised to it (:mod:`napari_convlora.standardize`),
    its brain's landmarks too if ``brain`` (a mask on ``volume``'s grid) says where the brain is. A
    ``curve`` (:mod:`napari_convlora.intensity_curve`) then maps its intensities.
    """
    ornt = orientations.io_orientation(volume.affine)
    to_ras = orientations.ornt_transform(ornt, orientations.axcodes2ornt("RAS"))
    ras = orientations.apply_orientation(volume.data, to_ras)
    ras_spacing = to_ras_order(volume.spacing, volume.affine)
    scaled = scale_intensity(ras, scaling)
    plane_shape = tuple(
        n if abs(s - PLANE_SPACING_MM) <= _SPACING_TOLERANCE else max(round(n * s / PLANE_SPACING_MM), 1)
        for n, s in zip(ras.shape[1:], ras_spacing[1:], strict=True)
    )
    head = _head_mask(scaled)
    box = tuple(
        _extent(
            head.any(axis=tuple(a for a in (0, 1, 2) if a != axis)), ras.shape[axis], HEAD_MARGIN_MM / ras_spacing[axis]
        )
        for axis in (0, 1, 2)
    )
    geometry = SliceGeometry(
        disk_shape=tuple(volume.data.shape),
        file_ornt=ornt,
        ras_shape=tuple(ras.shape),
        ras_spacing=tuple(float(s) for s in ras_spacing),
        plane_shape=plane_shape,
        x_range=box[0],
        crop=(0, 0, 0, 0),
    )
    if reference is not None:  # after the head is found: standardising changes intensities, never the geometry
        ras_brain = None if brain is None else orientations.apply_orientation(brain, to_ras)
        standardize(scaled, reference, ras_brain)
    if curve is not None:
        curve.apply(scaled)
    return geometry.restricted(box), scaled


def _head_mask(scaled: np.ndarray) -> np.ndarray:
    """Voxels brighter than Otsu's threshold, speckles removed: where the head is."""
    threshold = threshold_otsu(scaled[::2, ::2, ::2])
    return opening(scaled > threshold, 1)


def _extent(profile: np.ndarray, n: int, margin: float) -> tuple[int, int]:
    idx = np.flatnonzero(profile)
    if idx.size == 0:
        return 0, n
    m = int(np.ceil(margin))
    return max(int(idx[0]) - m, 0), min(int(idx[-1]) + 1 + m, n)


def _pad_to_multiple(lo: int, hi: int, multiple: int) -> tuple[int, int]:
    size = max(hi - lo, multiple)
    extra = (-size) % multiple
    lo -= extra // 2
    return lo, lo + size + extra


def select_slices(stack: np.ndarray, n: int) -> list[int]:
    """``n`` slices spread evenly over the head, skipping slices with little or no head in them."""
    content = (stack > 0.1).mean(axis=(1, 2))
    candidates = np.flatnonzero(content >= 0.25 * content.max())
    if len(candidates) <= n:
        return [int(i) for i in candidates]
    positions = (np.arange(n) + 0.5) / n * len(candidates)
    return [int(candidates[int(p)]) for p in positions]
