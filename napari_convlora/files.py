"""Writing user-visible files safely: check the destination first, write aside, publish atomically.

A failed or cancelled run never leaves a half-written file under the real name,
and an existing file is never replaced unless the user said so, even if
another process creates it while we work (the final step is a hard link, which
fails if the name exists, rather than a rename, which would replace it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import InputError


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (read once: reading it means setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


NEW_FILE_MODE = _new_file_mode()


def check_output_path(path: str | os.PathLike, overwrite: bool = False, suffixes: Sequence[str] = ()) -> Path:
    """Check before any work that ``path`` can be written: suffix, existing writable folder, no clobbering."""
    path = Path(path)
    if suffixes and not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{path}: output must end in {' or '.join(suffixes)}")
    folder = path.parent
    if not folder.exists():
        raise InputError(f"{path}: the output folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the output folder {folder} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` and publish the result as ``path``; on any failure remove the temporary file.

    The temporary name keeps the suffixes (``.nii.gz``) because writers pick the
    format from them. Without ``overwrite`` an existing ``path`` is an InputError.
    The file gets the usual mode of a new file (some writers, safetensors among
    them, create 0600 files, which a colleague could not read from a shared folder).
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.chmod(tmp, NEW_FILE_MODE)
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_new(tmp, path)
    except FileExistsError:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied while writing") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def publish_new(tmp: Path, path: Path) -> None:
    """Give the file ``tmp`` the name ``path`` too (or instead, without hard links); never replaces ``path``.

    Raises FileExistsError if ``path`` exists, even if it appeared a moment ago.
    """
    try:
        os.link(tmp, path)  # fails with FileExistsError if someone else created path meanwhile
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: the check-then-rename fallback
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
