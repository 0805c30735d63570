"""The adapter library: ``convlora adapters list/show/remove/import/export`` and the core functions behind them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import napari_convlora.adapters as adapters_module
from napari_convlora import library
from napari_convlora.adapters import save_adapter
from napari_convlora.cli import main
from napari_convlora.library import BUILTIN_ADAPTERS as SHIPPED_ADAPTERS
from napari_convlora.model import save_model

from .conftest import make_model
from .test_adapter_files import trained_adapter


@pytest.fixture(autouse=True)
def _gate_open(gate_open):
    pass


@pytest.fixture(autouse=True)
def _library(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(library, "BUILTIN_ADAPTERS", tmp_path / "builtin")


@pytest.fixture
def shared(tmp_path) -> Path:
    """An adapter file as another site would send it, for the tiny model of ``model_file``."""
    return save_adapter(trained_adapter(make_model(4), "ge-15t", description="GE 1.5T"), tmp_path / "ge.safetensors")


@pytest.fixture
def builtin(tmp_path) -> Path:
    """A fake built-in adapter called ``site-x``."""
    (tmp_path / "builtin").mkdir()
    return save_adapter(trained_adapter(make_model(4), "site-x", seed=2), tmp_path / "builtin" / "site-x.safetensors")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def refused(capsys, *argv) -> str:
    """Run a command that must be refused: exit 2, nothing on stdout, one ``error:`` line; return it."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err


def user_files(tmp_path) -> list[str]:
    folder = tmp_path / "home" / "adapters"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_import_list_show_export_remove_round_trip(capsys, tmp_path, shared, model_file):
    imported = run_json(capsys, "adapters", "import", shared)
    assert imported["name"] == "ge-15t" and imported["source"] == "user" and imported["error"] is None
    assert Path(imported["path"]) == tmp_path / "home" / "adapters" / "ge-15t.safetensors"
    assert Path(imported["path"]).read_bytes() == shared.read_bytes()  # what was checked is what was written

    listed = run_json(capsys, "adapters", "list", "--model", model_file)
    assert listed["model_id"] == make_model(4).model_id
    [entry] = listed["adapters"]
    assert (entry["name"], entry["source"], entry["kind"], entry["fits"]) == ("ge-15t", "user", "convlora", True)
    assert entry["domain"] == "ge-15t" and entry["description"] == "GE 1.5T"
    assert entry["size_bytes"] == shared.stat().st_size and entry["base_model_id"] == listed["model_id"]

    shown = run_json(capsys, "adapters", "show", "ge-15t", "--model", model_file)
    assert shown["metadata"]["epochs"] == 5 and shown["metadata"]["lr"] == 1e-4
    assert shown["trainable_parameters"] == trained_adapter(make_model(4)).trainable_parameters > 0
    assert shown["size_bytes"] == entry["size_bytes"] and shown["fits"] is True

    out_file = tmp_path / "out" / "to-site-b.safetensors"
    out_file.parent.mkdir()
    exported = run_json(capsys, "adapters", "export", "ge-15t", out_file)
    assert Path(exported["path"]) == out_file and out_file.read_bytes() == shared.read_bytes()

    removed = run_json(capsys, "adapters", "remove", "ge-15t")
    assert Path(removed["path"]) == tmp_path / "home" / "adapters" / "ge-15t.safetensors"
    assert user_files(tmp_path) == []
    assert run_json(capsys, "adapters", "list", "--model", model_file)["adapters"] == []
    assert "no adapter named 'ge-15t'" in refused(capsys, "adapters", "show", "ge-15t", "--model", model_file)
    assert "no adapter named 'ge-15t'" in refused(capsys, "adapters", "remove", "ge-15t")
    assert "no adapter named 'ge-15t'" in refused(capsys, "adapters", "export", "ge-15t", tmp_path / "x.safetensors")


def test_human_output_of_every_action(capsys, tmp_path, shared, model_file):
    code, out, _ = run(capsys, "adapters", "import", shared)
    assert (
        code == 0 and out == f"{shared}: imported as 'ge-15t' ({tmp_path / 'home' / 'adapters'}/ge-15t.safetensors)\n"
    )
    code, out, _ = run(capsys, "adapters", "list", "--model", model_file)
    header, row, footer = out.splitlines()
    assert header.split()[:4] == ["name", "source", "kind", "base"]
    assert row.split()[:5] == ["ge-15t", "user", "convlora", make_model(4).model_id[:12], "yes"]
    assert row.endswith("GE 1.5T") and footer.startswith("(1 adapters")
    code, out, _ = run(capsys, "adapters", "show", "ge-15t", "--model", model_file)
    assert code == 0 and "trainable_parameters" in out and "\nmetadata.description      GE 1.5T\n" in out
    code, out, _ = run(capsys, "adapters", "export", "ge-15t", tmp_path / "e.safetensors")
    assert code == 0 and out == f"ge-15t: exported to {tmp_path / 'e.safetensors'}\n"
    code, out, _ = run(capsys, "adapters", "remove", "ge-15t")
    assert code == 0 and out.startswith("ge-15t: removed ")


def test_list_says_whether_each_adapter_fits_the_model(capsys, tmp_path, shared, model_file):
    run_json(capsys, "adapters", "import", shared)
    other = tmp_path / "other.safetensors"
    save_model(make_model(4, seed=9), other)
    [entry] = run_json(capsys, "adapters", "list", "--model", other)["adapters"]
    assert entry["fits"] is False
    code, out, _ = run(capsys, "adapters", "list", "--model", other)
    assert code == 0 and out.splitlines()[1].split()[4] == "no"


def test_a_duplicate_name_is_refused_unless_name_gives_a_new_one(capsys, tmp_path, shared):
    run_json(capsys, "adapters", "import", shared)
    before = (tmp_path / "home" / "adapters" / "ge-15t.safetensors").read_bytes()
    other = save_adapter(trained_adapter(make_model(4), "ge-15t", seed=7), tmp_path / "other.safetensors")
    err = refused(capsys, "adapters", "import", other)
    assert "an adapter named 'ge-15t' exists" in err and "--name" in err and str(other) in err
    assert (tmp_path / "home" / "adapters" / "ge-15t.safetensors").read_bytes() == before
    assert run_json(capsys, "adapters", "import", other, "--name", "ge-15t-b")["name"] == "ge-15t-b"
    assert user_files(tmp_path) == ["ge-15t-b.safetensors", "ge-15t.safetensors"]
    assert "invalid adapter name" in refused(capsys, "adapters", "import", other, "--name", "../escape")


def test_a_file_whose_own_name_is_unusable_needs_name(capsys, tmp_path):
    odd = save_adapter(trained_adapter(make_model(4), "GE 1.5T / site B"), tmp_path / "odd.safetensors")
    err = refused(capsys, "adapters", "import", odd)
    assert str(odd) in err and "pass --name" in err
    assert run_json(capsys, "adapters", "import", odd, "--name", "site-b")["domain"] == "GE 1.5T / site B"


def test_builtins_come_first_cannot_be_removed_or_shadowed(capsys, tmp_path, builtin, shared, model_file):
    run_json(capsys, "adapters", "import", shared)
    listed = run_json(capsys, "adapters", "list", "--model", model_file)["adapters"]
    assert [(e["name"], e["source"]) for e in listed] == [("site-x", "builtin"), ("ge-15t", "user")]

    err = refused(capsys, "adapters", "remove", "site-x")
    assert "built-in adapter and cannot be removed" in err and str(builtin) in err
    assert builtin.is_file()
    assert "name of a built-in adapter" in refused(capsys, "adapters", "import", shared, "--name", "site-x")
    assert "name of a built-in adapter" in refused(
        capsys, "adapt", tmp_path / "scan.nii.gz", "--name", "site-x", "--model", model_file
    )
    assert user_files(tmp_path) == ["ge-15t.safetensors"]

    # A file copied by hand into the user folder under a built-in's name is shown as unusable, never used.
    (tmp_path / "home" / "adapters" / "site-x.safetensors").write_bytes(shared.read_bytes())
    entries = run_json(capsys, "adapters", "list", "--model", model_file)["adapters"]
    shadow = [e for e in entries if e["name"] == "site-x" and e["source"] == "user"]
    assert len(shadow) == 1 and "name of a built-in adapter" in shadow[0]["error"]
    assert library.resolve_adapter("site-x").path == builtin
    assert run_json(capsys, "adapters", "show", "site-x", "--model", model_file)["source"] == "builtin"


def test_broken_files_in_the_library_are_listed_shown_as_errors_and_removable(capsys, tmp_path, model_file):
    folder = tmp_path / "home" / "adapters"
    folder.mkdir(parents=True)
    (folder / "broken.safetensors").write_bytes(b"not an adapter")
    (folder / ".ge.tmp123.safetensors").write_bytes(b"a write in progress")
    (folder / "notes.txt").write_text("not an adapter file name")
    [entry] = run_json(capsys, "adapters", "list", "--model", model_file)["adapters"]
    assert entry["name"] == "broken" and "not a safetensors file" in entry["error"] and entry["fits"] is None
    code, out, _ = run(capsys, "adapters", "list", "--model", model_file)
    assert code == 0 and "unusable: " in out.splitlines()[1]
    err = refused(capsys, "adapters", "show", "broken", "--model", model_file)
    assert str(folder / "broken.safetensors") in err and "not a safetensors file" in err
    assert "not a safetensors file" in refused(capsys, "adapters", "export", "broken", tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    run_json(capsys, "adapters", "remove", "broken")
    assert sorted(p.name for p in folder.iterdir()) == [".ge.tmp123.safetensors", "notes.txt"]


def test_export_never_clobbers_without_overwrite(capsys, tmp_path, shared):
    run_json(capsys, "adapters", "import", shared)
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"someone else's file")
    assert "already exists" in refused(capsys, "adapters", "export", "ge-15t", target)
    assert target.read_bytes() == b"someone else's file"
    run_json(capsys, "adapters", "export", "ge-15t", target, "--overwrite")
    assert target.read_bytes() == shared.read_bytes()
    own = tmp_path / "home" / "adapters" / "ge-15t.safetensors"
    assert "library's own file" in refused(capsys, "adapters", "export", "ge-15t", own, "--overwrite")
    assert ".safetensors" in refused(capsys, "adapters", "export", "ge-15t", tmp_path / "a.pt")
    assert "does not exist" in refused(capsys, "adapters", "export", "ge-15t", tmp_path / "no" / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _fails_midway(monkeypatch) -> None:
    """Make the adapter writer put half a file on disk, then fail as a full disk would."""
    real_save_file = adapters_module.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(adapters_module, "save_file", half_then_fail)


def test_an_import_that_fails_midway_leaves_nothing(capsys, tmp_path, shared, monkeypatch):
    _fails_midway(monkeypatch)
    err = refused(capsys, "adapters", "import", shared)
    assert "cannot write" in err and "ge-15t.safetensors" in err
    assert user_files(tmp_path) == []  # neither the adapter nor its temporary file


def test_an_export_that_fails_midway_leaves_nothing(capsys, tmp_path, shared, monkeypatch):
    run_json(capsys, "adapters", "import", shared)
    out = tmp_path / "out"
    out.mkdir()
    _fails_midway(monkeypatch)
    err = refused(capsys, "adapters", "export", "ge-15t", out / "ge.safetensors")
    assert "cannot write" in err and str(out / "ge.safetensors") in err
    assert list(out.iterdir()) == []
    assert user_files(tmp_path) == ["ge-15t.safetensors"]


def test_library_functions_work_without_the_cli(tmp_path, shared, builtin):
    """The widget calls these directly: same checks, Python values."""
    info = library.import_adapter(shared, "mine")
    assert info.name == "mine" and info.metadata["name"] == "ge-15t" and info.fits is None
    model_id = make_model(4).model_id
    assert [(e.name, e.source, e.fits) for e in library.list_adapters(model_id)] == [
        ("site-x", "builtin", True),
        ("mine", "user", True),
    ]
    assert library.adapter_info("site-x").trainable_parameters == info.trainable_parameters
    exported = library.export_adapter("site-x", tmp_path / "x.safetensors")
    assert exported.read_bytes() == builtin.read_bytes()
    assert library.remove_adapter("mine") == tmp_path / "home" / "adapters" / "mine.safetensors"
    assert [e.name for e in library.list_adapters()] == ["site-x"]


def test_adapt_records_a_description_that_the_library_shows(capsys, small_path, model_file):
    code, _, err = run(
        capsys,
        "adapt",
        small_path,
        "--name",
        "site-c",
        "--description",
        "Siemens 3T, MPRAGE",
        "--model",
        model_file,
        "--slices",
        2,
        "--epochs",
        1,
        "--objective",
        "early-head",
    )
    assert code == 0, err
    shown = run_json(capsys, "adapters", "show", "site-c", "--model", model_file)
    assert shown["description"] == "Siemens 3T, MPRAGE" and shown["fits"] is True
    assert shown["metadata"]["epochs"] == 1 and len(shown["metadata"]["slices"]) == 2
    assert {"seed", "lr", "agreements", "best_epoch", "layers", "created", "software_version"} <= set(shown["metadata"])


def test_names_and_files_that_are_not_adapters_are_refused(capsys, tmp_path):
    assert "no such file" in refused(capsys, "adapters", "import", tmp_path / "absent.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    assert "not a safetensors file" in refused(capsys, "adapters", "import", tmp_path / "folder.safetensors")
    for action in ("show", "remove"):
        assert "invalid adapter name '../home'" in refused(capsys, "adapters", action, "../home")
    assert "invalid adapter name" in refused(capsys, "adapters", "export", "../home", tmp_path / "x.safetensors")
    assert "required: action" in refused(capsys, "adapters")
    assert user_files(tmp_path) == []


def test_rename_keeps_the_file_and_refuses_builtins_and_taken_names(capsys, tmp_path, builtin, shared):
    run_json(capsys, "adapters", "import", shared)
    other = save_adapter(trained_adapter(make_model(4), "b", seed=7), tmp_path / "b.safetensors")
    run_json(capsys, "adapters", "import", other)
    renamed = run_json(capsys, "adapters", "rename", "ge-15t", "site-b-ge")
    assert Path(renamed["path"]) == tmp_path / "home" / "adapters" / "site-b-ge.safetensors"
    assert Path(renamed["path"]).read_bytes() == shared.read_bytes()  # same bytes: metadata name unchanged
    assert user_files(tmp_path) == ["b.safetensors", "site-b-ge.safetensors"]
    assert "an adapter named 'b' exists" in refused(capsys, "adapters", "rename", "site-b-ge", "b")
    assert "name of a built-in adapter" in refused(capsys, "adapters", "rename", "site-b-ge", "site-x")
    assert "cannot be renamed" in refused(capsys, "adapters", "rename", "site-x", "mine")
    assert "invalid adapter name" in refused(capsys, "adapters", "rename", "b", "../escape")
    assert user_files(tmp_path) == ["b.safetensors", "site-b-ge.safetensors"] and builtin.is_file()
    code, out, _ = run(capsys, "adapters", "rename", "b", "c")
    assert code == 0 and out.startswith("b: renamed to 'c'")


def test_a_scanner_reference_is_listed_as_its_heads_not_its_numbers(capsys, tmp_path):
    """A built-in's reference holds thousands of numbers; `show` and `--json` give its heads and layer count."""
    (tmp_path / "builtin").mkdir()
    shipped = (SHIPPED_ADAPTERS / "siemens-3t.safetensors").read_bytes()
    (tmp_path / "builtin" / "siemens-3t.safetensors").write_bytes(shipped)
    code, out, _ = run(capsys, "adapters", "show", "siemens-3t")
    [line] = [line for line in out.splitlines() if line.startswith("metadata.scanner_reference")]
    assert code == 0 and len(line) < 300 and "ds000031" in line
    reference = run_json(capsys, "adapters", "show", "siemens-3t")["metadata"]["scanner_reference"]
    assert reference["layers"] == 27 and len(reference["heads"]) == 7
