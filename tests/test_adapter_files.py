"""Adapter files come from other sites: every kind of bad file is refused with one message naming it.

Each test builds the bad file itself (a real pickle, a truncated copy, an
extra tensor, ...) and checks both the core (:func:`load_adapter`) and what a
user sees from ``convlora adapters import`` (exit 2, one ``error:`` line,
nothing added to the library).
"""

from __future__ import annotations

import json
import math
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_convlora import files
from napari_convlora.adapters import (
    ADAPTER_FORMAT_VERSION,
    apply_adapter,
    extract_adapter,
    inject_adapters,
    inject_convlora,
    load_adapter,
    lora_layers,
    moe_layers,
    new_metadata,
    save_adapter,
)
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.model import METADATA_KEY

from .conftest import make_model


@pytest.fixture(autouse=True)
def _library(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("napari_convlora.library.BUILTIN_ADAPTERS", tmp_path / "builtin")


def trained_adapter(model, name: str = "scanner-a", seed: int = 1, description: str = ""):
    """An adapter of ``model`` with non-zero ConvLoRA updates, as adaptation would leave it."""
    unet = model.copy().unet
    inject_convlora(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            layer.lora_B.normal_(generator=generator)
    return extract_adapter(unet, new_metadata(model, name, 2, 2.0, description=description, epochs=5, lr=1e-4))


def write_raw(path: Path, tensors: dict, metadata: dict) -> Path:
    """Write a safetensors file directly, bypassing every check of :func:`save_adapter`."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


class _RunsCode:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle(path: Path, tensors: dict, metadata: dict) -> Path:
    path.write_bytes(pickle.dumps({"tensors": tensors, "run": _RunsCode(path.with_name("unpickled"))}))
    return path


def _torch_save(path: Path, tensors: dict, metadata: dict) -> Path:
    torch.save(tensors, path)
    return path


def _truncated(path: Path, tensors: dict, metadata: dict) -> Path:
    write_raw(path, tensors, metadata)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _header_only(path: Path, tensors: dict, metadata: dict) -> Path:
    write_raw(path, tensors, metadata)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    path.write_bytes(path.read_bytes()[:header])
    return path


def _changed(tensors: dict, key: str, value) -> dict:
    return {**tensors, key: value}


FIRST_B = "init_path.0.lora_B"
FIRST_BN = "init_path.2.conv_path.0.0.running_var"

BAD_FILES = {
    # case: (build(path, tensors, metadata) -> path, expected words in the message)
    "pickle": (_pickle, "not a safetensors file"),
    "torch.save": (_torch_save, "not a safetensors file"),
    "empty file": (lambda p, t, m: (p.write_bytes(b""), p)[1], "not a safetensors file"),
    "truncated": (_truncated, "truncated"),
    "header without data": (_header_only, "truncated"),
    "no metadata": (lambda p, t, m: (save_file(t, str(p)), p)[1], "has no 'convlora' metadata"),
    "model file": (lambda p, t, m: write_raw(p, t, {**m, "format": "convlora-model"}), "expected 'convlora-adapter'"),
    "newer format": (
        lambda p, t, m: write_raw(p, t, {**m, "format_version": ADAPTER_FORMAT_VERSION + 1}),
        f"format version {ADAPTER_FORMAT_VERSION + 1} is newer",
    ),
    "unknown kind": (lambda p, t, m: write_raw(p, t, {**m, "kind": "moe-lora"}), "adapter kind 'moe-lora'"),
    "bad rank": (lambda p, t, m: write_raw(p, t, {**m, "rank": 0}), "rank must be a positive integer"),
    "bad alpha": (lambda p, t, m: write_raw(p, t, {**m, "alpha": "two"}), "alpha must be a positive number"),
    "no base model id": (lambda p, t, m: write_raw(p, t, {**m, "base_model_id": "abc"}), "no valid base_model_id"),
    "description not text": (lambda p, t, m: write_raw(p, t, {**m, "description": 3}), "'description' must be text"),
    "layers disagree": (lambda p, t, m: write_raw(p, t, {**m, "layers": ["down1.1"]}), "'layers' does not match"),
    "rank disagrees with tensors": (lambda p, t, m: write_raw(p, t, {**m, "rank": 3}), "expected torch.float32"),
    "extra tensor": (lambda p, t, m: write_raw(p, _changed(t, "decoder.evil", torch.zeros(3)), m), "'decoder.evil'"),
    "missing tensor": (lambda p, t, m: write_raw(p, {k: v for k, v in t.items() if k != FIRST_B}, m), FIRST_B),
    "float64 tensor": (
        lambda p, t, m: write_raw(p, _changed(t, FIRST_B, t[FIRST_B].double()), m),
        f"{FIRST_B} is torch.float64",
    ),
    "wrong shape": (lambda p, t, m: write_raw(p, _changed(t, FIRST_B, t[FIRST_B][:-1]), m), f"tensor {FIRST_B} is"),
    "no width probe": (
        lambda p, t, m: write_raw(p, {k: v for k, v in t.items() if not k.startswith("init_path.2.conv_path.0.0")}, m),
        "no valid init_path.2.conv_path.0.0.weight",
    ),
    "NaN": (lambda p, t, m: write_raw(p, _changed(t, FIRST_B, t[FIRST_B] * math.nan), m), "NaN or Inf"),
    "Inf": (lambda p, t, m: write_raw(p, _changed(t, FIRST_BN, t[FIRST_BN] + math.inf), m), "NaN or Inf"),
}


def trained_moe_adapter(model, experts: int = 4, seed: int = 1):
    """A ``moe`` adapter of ``model`` with non-zero B and gates, as adaptation would leave it."""
    unet = model.copy().unet
    inject_adapters(unet, "moe", experts=experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_layers(unet):
            layer.lora_B.normal_(generator=generator)
            layer.gate_weight.normal_(generator=generator)
    return extract_adapter(unet, new_metadata(model, "scanner-m", 2, 2.0, kind="moe", experts=experts))


FIRST_GATE = "init_path.0.gate_weight"
FIRST_EXPERTS = "init_path.0.experts_weight"

MOE_BAD_FILES = {
    # case: (build(path, tensors, metadata) -> path, expected words in the message); the tensors have 4 experts
    "no experts": (
        lambda p, t, m: write_raw(p, t, {k: v for k, v in m.items() if k != "experts"}),
        "'experts' must be a positive integer, got None",
    ),
    "bad experts": (lambda p, t, m: write_raw(p, t, {**m, "experts": 0}), "'experts' must be a positive integer"),
    "experts disagree with tensors": (
        lambda p, t, m: write_raw(p, t, {**m, "experts": 8}),
        "experts_bias is torch.float32(8,), expected torch.float32(16,)",
    ),
    "missing gate": (lambda p, t, m: write_raw(p, {k: v for k, v in t.items() if k != FIRST_GATE}, m), FIRST_GATE),
    "extra expert tensor": (
        lambda p, t, m: write_raw(p, _changed(t, "init_path.0.experts_scale", torch.ones(4)), m),
        "'init_path.0.experts_scale'",
    ),
    "wrong expert shape": (
        lambda p, t, m: write_raw(p, _changed(t, FIRST_EXPERTS, t[FIRST_EXPERTS][:-2]), m),
        f"tensor {FIRST_EXPERTS} is torch.float32(6, 2, 3, 3)",
    ),
    "moe tensors called convlora": (
        lambda p, t, m: write_raw(p, t, {k: v for k, v in m.items() if k != "experts"} | {"kind": "convlora"}),
        "do not fit a U-Net with convlora adapters",
    ),
    "NaN gate": (lambda p, t, m: write_raw(p, _changed(t, FIRST_GATE, t[FIRST_GATE] * math.nan), m), "NaN or Inf"),
}


def _refused(path: Path, words: str, tmp_path: Path, capsys) -> None:
    """Refused by the core and by ``convlora adapters import``: one message naming the file, nothing imported."""
    with pytest.raises(InputError) as caught:
        load_adapter(path)
    assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value), str(caught.value)

    code = main(["adapters", "import", str(path), "--name", "incoming"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(f"error: {path}: ") and words in err
    library = tmp_path / "home" / "adapters"
    assert not library.exists() or list(library.iterdir()) == []
    assert not (tmp_path / "unpickled").exists()  # the pickle was never executed


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_files_are_refused_naming_the_file(case, tmp_path, capsys):
    adapter = trained_adapter(make_model(4))
    build, words = BAD_FILES[case]
    _refused(build(tmp_path / "shared.safetensors", adapter.tensors, adapter.metadata), words, tmp_path, capsys)


@pytest.mark.parametrize("case", list(MOE_BAD_FILES))
def test_bad_moe_adapter_files_are_refused_naming_the_file(case, tmp_path, capsys):
    adapter = trained_moe_adapter(make_model(4))
    build, words = MOE_BAD_FILES[case]
    _refused(build(tmp_path / "shared.safetensors", adapter.tensors, adapter.metadata), words, tmp_path, capsys)


def test_convlora_tensors_called_moe_are_refused(tmp_path, capsys):
    adapter = trained_adapter(make_model(4))
    path = write_raw(
        tmp_path / "shared.safetensors", adapter.tensors, {**adapter.metadata, "kind": "moe", "experts": 8}
    )
    _refused(path, "do not fit a U-Net with moe adapters (missing ['down1.1.experts_bias'", tmp_path, capsys)


def test_a_good_moe_file_loads_and_is_listed_with_its_kind(tmp_path, capsys, model_file):
    model = make_model(4)
    adapter = trained_moe_adapter(model)
    loaded = load_adapter(save_adapter(adapter, tmp_path / "m.safetensors"))
    assert loaded.metadata["kind"] == "moe" and loaded.metadata["experts"] == 4
    assert loaded.trainable_parameters == adapter.trainable_parameters > 0
    assert all(torch.equal(loaded.tensors[k], v) for k, v in adapter.tensors.items())
    assert main(["adapters", "import", str(tmp_path / "m.safetensors"), "--name", "site-m"]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--model", str(model_file)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("site-m "))
    assert row.split()[1:4] == ["user", "moe", model.model_id[:12]] and " yes " in row
    assert main(["adapters", "show", "site-m", "--model", str(model_file), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "moe" and shown["metadata"]["experts"] == 4
    assert shown["trainable_parameters"] == adapter.trainable_parameters


def test_the_pickle_fixture_really_runs_code_when_unpickled(tmp_path):
    """Guards the test above: its pickle is a real one that would have left a marker."""
    path = _pickle(tmp_path / "evil.safetensors", {"a": torch.zeros(1)}, {})
    pickle.loads(path.read_bytes())
    assert (tmp_path / "unpickled").exists()


def test_a_good_file_loads_and_keeps_what_it_records(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "NEW_FILE_MODE", 0o644)  # what a umask of 022 gives
    model = make_model(4)
    adapter = trained_adapter(model, description="GE 1.5T, site B")
    loaded = load_adapter(save_adapter(adapter, tmp_path / "a.safetensors"))
    meta = loaded.metadata
    assert meta["description"] == "GE 1.5T, site B" and meta["kind"] == "convlora" and meta["name"] == "scanner-a"
    assert meta["base_model_id"] == model.model_id and meta["rank"] == 2 and meta["alpha"] == 2.0
    assert {"created", "software_version", "layers", "epochs", "lr"} <= set(meta)
    assert all(torch.equal(loaded.tensors[k], v) for k, v in adapter.tensors.items())
    # readable like any new file (safetensors alone would leave 0600: unreadable by a colleague)
    assert stat.S_IMODE(loaded.path.stat().st_mode) == 0o644


def test_another_base_model_is_refused_naming_both_ids_and_the_file(tmp_path):
    model, other = make_model(4, seed=0), make_model(4, seed=5)
    path = save_adapter(trained_adapter(model), tmp_path / "a.safetensors")
    with pytest.raises(InputError) as caught:
        apply_adapter(other, load_adapter(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and model.model_id[:12] in message and other.model_id[:12] in message


def test_width_is_read_from_the_file_without_building_the_network(tmp_path):
    """A file claiming a huge U-Net is checked on shape-only tensors, not by allocating that network."""
    adapter = trained_adapter(make_model(4))
    tensors = dict(adapter.tensors)
    tensors["init_path.2.conv_path.0.0.weight"] = torch.ones(100_000)
    path = write_raw(tmp_path / "huge.safetensors", tensors, adapter.metadata)
    with pytest.raises(InputError, match=r"expected torch\.float32"):
        load_adapter(path)
