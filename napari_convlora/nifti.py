"""Reading and writing NIfTI volumes, with every check a user's file needs.

nibabel silently "repairs" some broken headers (zero or negative voxel sizes
become 1 or their absolute value), so the raw header is read once more without
those repairs: a mask written on a grid the user did not have is worse than a
clear refusal.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError
from .files import atomic_write, check_output_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without ``.nii`` or ``.nii.gz``: the name of what is made from a scan (adapter, mask)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


@dataclass
class Volume:
    """A 3D scalar volume as stored on disk: data in file order, affine and header."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (lengths of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike) -> Volume:
    """Load a 3D NIfTI volume (a 4D file with one volume is accepted) or raise InputError."""
    path = Path(path)
    data, img = _load_image(path)
    data = _as_3d(data, path)
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(f"{path}: {int(data.size - finite.sum())} voxels are NaN or Inf")
    if data.max() == data.min():
        raise InputError(f"{path}: the volume is constant (every voxel is {data.flat[0]!r}); nothing to segment")
    return Volume(data=data, affine=img.affine.copy(), header=img.header.copy(), path=path)


def load_mask(path: str | os.PathLike) -> Volume:
    """Load a binary mask (any non-zero label above 0.5 is foreground) as uint8 0/1."""
    path = Path(path)
    data, img = _load_image(path)
    data = _as_3d(data, path)
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the mask has NaN or Inf voxels")
    return Volume(data=(data > 0.5).astype(np.uint8), affine=img.affine.copy(), header=img.header.copy(), path=path)


def _load_image(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a NIfTI file")
    if not is_nifti_path(path):
        raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError) as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({_first_line(exc)})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read the file, it may be truncated or corrupt ({_first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI file ({type(img).__name__})")
    _check_geometry(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.spatialimages.ImageDataError) as exc:
        raise InputError(f"{path}: the image data is truncated or corrupt ({_first_line(exc)})") from None
    if data.dtype.fields is not None or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{path}: unsupported voxel type {data.dtype} (need real numbers: integers or floats)")
    return data, img


@contextmanager
def _quiet_nibabel():
    """nibabel logs header repairs to stderr; we report problems ourselves, in one line."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_geometry(path: Path, img: nib.Nifti1Image) -> None:
    """Refuse zero/negative voxel sizes and singular or non-finite affines."""
    ndim = int(img.header["dim"][0])
    n_spatial = min(max(ndim, 1), 3)
    raw_pixdim = _raw_pixdim(path, type(img.header))[1 : 1 + n_spatial]
    if np.any(~np.isfinite(raw_pixdim)) or np.any(raw_pixdim <= 0):
        sizes = ", ".join(f"{v:g}" for v in raw_pixdim)
        raise InputError(f"{path}: voxel sizes must be positive, the header says ({sizes})")
    affine = img.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the affine (voxel-to-world matrix) is singular or not finite")


def _raw_pixdim(path: Path, header_class: type) -> np.ndarray:
    """pixdim exactly as written in the file, before nibabel's repairs."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh, _quiet_nibabel():
            raw = header_class.from_fileobj(fh, check=False)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"{path}: cannot read the NIfTI header ({_first_line(exc)})") from None
    return np.asarray(raw["pixdim"], dtype=np.float64)


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim < 3:
        raise InputError(f"{path}: the image is {data.ndim}D, a 3D volume is needed")
    if data.ndim > 3:
        extra = data.shape[3:]
        if int(np.prod(extra)) != 1:
            raise InputError(f"{path}: a 4D series of {int(np.prod(extra))} volumes; give one 3D volume")
        data = data.reshape(data.shape[:3])
    if min(data.shape) < 2:
        raise InputError(f"{path}: the volume has shape {data.shape}; every axis needs at least 2 voxels")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``volume.data`` exactly (no intensity scaling) with its affine and header, atomically."""
    path = check_output_path(path, overwrite=overwrite, suffixes=NIFTI_SUFFIXES)
    image_class = nib.Nifti2Image if isinstance(volume.header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(volume.data, volume.affine, volume.header)
    img.header.set_slope_inter(1.0, 0.0)  # never let an input's scl_slope/inter rescale what we write
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite)
    return path


def save_mask(mask: np.ndarray, like: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a 0/1 uint8 mask on ``like``'s grid, with its affine and header, atomically."""
    if mask.shape != like.data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {like.data.shape}")
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header["cal_min"], header["cal_max"] = 0, 1
    return save_volume(Volume(mask.astype(np.uint8), like.affine, header), path, overwrite=overwrite)
