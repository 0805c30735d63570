"""The napari manifest: valid for npe2, found in the editable install, and carried inside a built wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

npe2 = pytest.importorskip("npe2")


def test_npe2_validate():
    npe2_cli = shutil.which("npe2") or str(Path(sys.executable).parent / "npe2")
    result = subprocess.run([npe2_cli, "validate", "napari-convlora"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_installed_package_finds_the_manifest():
    manifest = npe2.PluginManifest.from_distribution("napari-convlora")
    assert manifest.display_name == "ConvLoRA Skull Strip"
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == ["ConvLoRA Skull Strip"]
    assert {s.key for s in contributions.sample_data} == {"colin27-t1", "colin27-t1-philips-3t", "colin27-mask"}
    assert {tuple(w.layer_types) for w in contributions.writers} == {("labels",), ("image",)}
    for command in contributions.commands:  # every python_name imports and resolves to a callable
        assert callable(npe2_resolve(command.python_name))


def npe2_resolve(python_name: str):
    from importlib import import_module

    module, _, attr = python_name.partition(":")
    return getattr(import_module(module), attr)


def test_wheel_carries_the_manifest(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("napari_convlora-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_convlora/napari.yaml" in names
        assert zf.read("napari_convlora/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        assert "napari_convlora/_napari/widget.py" in names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert "[napari.manifest]" in text
    assert "napari-convlora = napari_convlora:napari.yaml" in text
