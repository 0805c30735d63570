"""Where models and named adapters live, how a user's ``--adapter``/``--model`` words resolve, and the library.

Named adapters: the built-ins shipped in ``resources/adapters/`` and the user's
own in ``$CONVLORA_HOME/adapters/`` (or the platform's user data folder). A name
is unique across both: a user adapter may not shadow a built-in, and built-ins
cannot be removed. Adapter files come from other sites, so everything that
enters or leaves the library is fully checked first (:func:`load_adapter`) and
written atomically, never replacing a file unless asked. The functions here
are what the CLI and the napari widget both call.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import platformdirs

from .adapters import Adapter, load_adapter, save_adapter
from .errors import InputError
from .files import check_output_path, publish_new
from .scanner_reference import METADATA_KEY as REFERENCE_KEY
from .scanner_reference import summary as reference_summary

RESOURCES = Path(str(files("napari_convlora.resources")))
SOURCE_MODEL = RESOURCES / "source_model.safetensors"
BUILTIN_ADAPTERS = RESOURCES / "adapters"
ADAPTER_SUFFIX = ".safetensors"
BUILTIN, USER = "builtin", "user"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def user_adapter_dir() -> Path:
    home = os.environ.get("CONVLORA_HOME")
    root = Path(home) if home else Path(platformdirs.user_data_dir("napari-convlora", appauthor=False))
    return root / "adapters"


def check_name(name: str) -> str:
    """Adapter names become file names: letters, digits, '.', '_', '-' only."""
    if not NAME_PATTERN.match(name) or name.endswith(ADAPTER_SUFFIX):
        raise InputError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def named_adapter_path(name: str) -> Path | None:
    """The file of the adapter called ``name``: a built-in first (user files may not shadow one), then the user's."""
    found = _locate(name)
    return found[1] if found else None


def _locate(name: str) -> tuple[str, Path] | None:
    for source, folder in ((BUILTIN, BUILTIN_ADAPTERS), (USER, user_adapter_dir())):
        candidate = folder / f"{name}{ADAPTER_SUFFIX}"
        if candidate.is_file():
            return source, candidate
    return None


def resolve_adapter(spec: str) -> Adapter | None:
    """``none`` -> None; a path to a file -> that adapter; otherwise a name in the library."""
    if spec == "none":
        return None
    path = Path(spec)
    if path.suffix == ADAPTER_SUFFIX or os.sep in spec or path.is_file():
        if not path.exists():
            raise InputError(f"{path}: no such adapter file")
        return load_adapter(path)
    found = named_adapter_path(spec)
    if found is None:
        raise InputError(f"no adapter named {spec!r} in {user_adapter_dir()} or the built-ins")
    return load_adapter(found)


def default_model_path() -> Path:
    if not SOURCE_MODEL.is_file():
        raise InputError(f"{SOURCE_MODEL}: no shipped source model in this installation; pass --model WEIGHTS")
    return SOURCE_MODEL


@dataclass
class AdapterInfo:
    """One named adapter as the library shows it; ``error`` says why a file found in the library cannot be used."""

    name: str
    source: str
    path: Path
    size_bytes: int
    sha256: str | None
    metadata: dict = field(default_factory=dict)
    trainable_parameters: int | None = None
    fits: bool | None = None
    error: str | None = None

    def to_json(self) -> dict:
        meta = self.metadata
        return {
            "name": self.name,
            "source": self.source,
            "path": str(self.path),
            "kind": meta.get("kind"),
            "base_model_id": meta.get("base_model_id"),
            "fits": self.fits,
            "domain": meta.get("name"),
            "description": meta.get("description", ""),
            "created": meta.get("created"),
            "trainable_parameters": self.trainable_parameters,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "error": self.error,
            "metadata": {k: reference_summary(v) if k == REFERENCE_KEY else v for k, v in meta.items()},
        }


def library_files() -> list[tuple[str, str, Path]]:
    """(name, source, path) of every adapter file: built-ins first, then the user's, each sorted by name.

    Only names that :func:`check_name` accepts count, so temporary files of
    writes in progress (``.NAME.tmpPID.safetensors``) are never listed.
    """
    found = []
    for source, folder in ((BUILTIN, BUILTIN_ADAPTERS), (USER, user_adapter_dir())):
        if folder.is_dir():
            names = sorted(p.name[: -len(ADAPTER_SUFFIX)] for p in folder.glob(f"*{ADAPTER_SUFFIX}") if p.is_file())
            found += [(n, source, folder / f"{n}{ADAPTER_SUFFIX}") for n in names if NAME_PATTERN.match(n)]
    return found


def _info(name: str, source: str, path: Path, model_id: str | None) -> AdapterInfo:
    """Check the file fully and describe it; InputError if it is not a valid adapter."""
    data = path.read_bytes()
    info = AdapterInfo(name, source, path, len(data), hashlib.sha256(data).hexdigest())
    adapter = load_adapter(path)
    info.metadata = adapter.metadata
    info.trainable_parameters = adapter.trainable_parameters
    info.fits = None if model_id is None else adapter.base_model_id == model_id
    return info


def list_adapters(model_id: str | None = None) -> list[AdapterInfo]:
    """Every adapter in the library; broken or shadowing files are listed with their ``error``, not skipped."""
    entries, builtins = [], set()
    for name, source, path in library_files():
        try:
            entry = _info(name, source, path, model_id)
        except (InputError, OSError) as exc:
            entry = AdapterInfo(name, source, path, path.stat().st_size, None, error=str(exc))
        if source == BUILTIN:
            builtins.add(name)
        elif name in builtins:
            entry.error = f"{path}: has the name of a built-in adapter, which is used instead; remove it"
        entries.append(entry)
    return entries


def _find(name: str) -> tuple[str, Path]:
    """(source, path) of a named adapter, or InputError; names are checked so they cannot point elsewhere."""
    found = _locate(check_name(name))
    if found is None:
        raise InputError(f"no adapter named {name!r} in {user_adapter_dir()} or the built-ins")
    return found


def adapter_info(name: str, model_id: str | None = None) -> AdapterInfo:
    """The named adapter, fully checked, with its metadata and whether it fits ``model_id``."""
    source, path = _find(name)
    return _info(name, source, path, model_id)


def remove_adapter(name: str) -> Path:
    """Delete a user adapter (even a broken one); built-ins belong to the installation and are refused."""
    source, path = _find(name)
    if source == BUILTIN:
        raise InputError(f"{path}: {name!r} is a built-in adapter and cannot be removed")
    try:
        path.unlink()
    except OSError as exc:
        raise InputError(f"{path}: cannot remove ({exc.strerror or exc})") from None
    return path


def rename_adapter(name: str, new_name: str) -> Path:
    """Give a user adapter another library name; built-ins are refused, and so is a name already taken.

    Only the file name changes (the metadata keeps the name it was made with, so
    a shared file stays byte-identical). The new name appears before the old one
    goes (hard link, then unlink), so no moment has the adapter missing.
    """
    source, path = _find(name)
    if source == BUILTIN:
        raise InputError(f"{path}: {name!r} is a built-in adapter and cannot be renamed")
    target = user_adapter_path(new_name, hint="choose another name")
    try:
        publish_new(path, target)
        path.unlink(missing_ok=True)  # already gone where hard links are not supported (publish_new moved it)
    except FileExistsError:
        raise InputError(f"{target}: an adapter named {new_name!r} exists; choose another name") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot rename ({exc.strerror or exc})") from None
    return target


def user_adapter_path(name: str, overwrite: bool = False, hint: str = "choose another name") -> Path:
    """Where a new user adapter called ``name`` goes, creating the library folder; refuses names taken.

    ``hint`` ends the refusal with what the caller's user can do about it.
    """
    check_name(name)
    builtin = BUILTIN_ADAPTERS / f"{name}{ADAPTER_SUFFIX}"
    if builtin.is_file():
        raise InputError(f"{builtin}: {name!r} is the name of a built-in adapter; {hint}")
    folder = user_adapter_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the adapter library folder ({exc.strerror or exc})") from None
    path = folder / f"{name}{ADAPTER_SUFFIX}"
    if path.exists() and not overwrite:
        raise InputError(f"{path}: an adapter named {name!r} exists; {hint}")
    return path


def import_adapter(file: str | os.PathLike, name: str | None = None) -> AdapterInfo:
    """Check ``file`` fully, then write what was checked into the user library under ``name``.

    ``name`` defaults to the name in the file's metadata. The library copy is
    written from the checked tensors and metadata (same content, and the same
    bytes for files this package wrote), so a file changed on disk meanwhile
    cannot slip in unchecked.
    """
    file = Path(file)
    adapter = load_adapter(file)
    if name is None:
        name = adapter.name
        if not NAME_PATTERN.match(name) or name.endswith(ADAPTER_SUFFIX):
            raise InputError(f"{file}: its name {name!r} cannot be a library name; pass --name NAME")
    path = user_adapter_path(name, hint=f"pass --name NEW_NAME to import {file} under another name")
    save_adapter(adapter, path)
    return _info(name, USER, path, None)


def export_adapter(name: str, file: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the named adapter, checked first, to ``file``; an existing file is replaced only with ``overwrite``."""
    _, source_path = _find(name)
    file = check_output_path(file, overwrite=overwrite, suffixes=(ADAPTER_SUFFIX,))
    if file.exists() and file.resolve() == source_path.resolve():
        raise InputError(f"{file}: is the library's own file of {name!r}")
    adapter = load_adapter(source_path)
    return save_adapter(adapter, file, overwrite=overwrite)
