"""``convlora demo``: the main job end to end on the bundled sample (with a small random model here)."""

from __future__ import annotations

import json

from napari_convlora.cli import main
from napari_convlora.demo import DEMO_PROFILE
from napari_convlora.nifti import load_mask, load_volume


def test_demo_writes_masks_adapter_and_a_table(capsys, tmp_path, model_file):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--model", str(model_file), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["simulated"] is True and set(result["results"]) == {"source model", "adapted"}
    assert result["profile"] == DEMO_PROFILE == "ge-1.5t"
    assert all(0.0 <= row["dice"] <= 1.0 for row in result["results"].values())
    scan = load_volume(out / f"sample_{DEMO_PROFILE}.nii.gz")
    for name in ("reference", "source", "adapted"):
        mask = load_mask(out / f"sample_{DEMO_PROFILE}_mask_{name}.nii.gz")
        assert mask.data.shape == scan.data.shape
    assert (out / f"demo-{DEMO_PROFILE}.safetensors").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["demo", "--out", str(out), "--model", str(model_file)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
