"""Where models and named adapters live, and how a user's ``--adapter``/``--model`` words resolve.

Named adapters: the built-ins shipped in ``resources/adapters/`` and the user's
own in ``$CONVLORA_HOME/adapters/`` (or the platform's user data folder).
"""

from __future__ import annotations

import os
import re
from importlib.resources import files
from pathlib import Path

import platformdirs

from .adapters import Adapter, load_adapter
from .errors import InputError

RESOURCES = Path(str(files("napari_convlora.resources")))
SOURCE_MODEL = RESOURCES / "source_model.safetensors"
BUILTIN_ADAPTERS = RESOURCES / "adapters"
ADAPTER_SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def user_adapter_dir() -> Path:
    home = os.environ.get("CONVLORA_HOME")
    root = Path(home) if home else Path(platformdirs.user_data_dir("napari-convlora", appauthor=False))
    return root / "adapters"


def check_name(name: str) -> str:
    """Adapter names become file names: letters, digits, '.', '_', '-' only."""
    if not _NAME.match(name) or name.endswith(ADAPTER_SUFFIX):
        raise InputError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def named_adapter_path(name: str) -> Path | None:
    """The file of the adapter called ``name``: the user's library first, then the built-ins."""
    for folder in (user_adapter_dir(), BUILTIN_ADAPTERS):
        candidate = folder / f"{name}{ADAPTER_SUFFIX}"
        if candidate.is_file():
            return candidate
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
