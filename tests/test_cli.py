"""The ``convlora`` command line: one JSON object with --json, exit codes 0/1/2, no partial outputs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_convlora.cli import main
from napari_convlora.model import save_model
from napari_convlora.nifti import load_mask

from .conftest import DATA, SAMPLE_MASK, make_model

# a ConvLoRA adapter in seconds (adapt's default objective, the intensity map, trains none)
CONVLORA_QUICK = ("--slices", 2, "--epochs", 1, "--objective", "early-head")


@pytest.fixture(autouse=True)
def _gate_open(gate_open):
    pass


@pytest.fixture(autouse=True)
def _library(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_segment_json(capsys, tmp_path, small_path, model_file):
    out_path = tmp_path / "mask.nii.gz"
    code, out, err = run(capsys, "segment", small_path, "-o", out_path, "--model", model_file, "--json")
    assert code == 0, err
    result = _one_json(out)
    assert set(result) == {"input", "output", "adapter", "seconds", "volume_ml"}
    assert result["adapter"] == "none" and Path(result["output"]) == out_path
    written, source = nib.load(str(out_path)), nib.load(str(small_path))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8
    code, out, err = run(
        capsys,
        "segment",
        small_path,
        "-o",
        tmp_path / "auto.nii.gz",
        "--model",
        model_file,
        "--adapter",
        "auto",
        "--json",
    )
    # the built-ins were made for the shipped model, not this one: auto skips them and says so
    assert code == 0, err
    result = _one_json(out)
    assert result["adapter"] == "none" and result["auto"]["choice"] == "source"
    assert set(result["auto"]["scores"]) == {"source"} and result["auto"]["criterion"] == "stats"
    assert err.startswith("note: auto chose source") and "skipped" in err


def test_segment_with_mirror_views_and_a_bad_count(capsys, tmp_path, small_path, model_file, monkeypatch):
    from napari_convlora import inference

    seen, predict = [], inference.predict_logits

    def spy(*args):
        seen.append(args[5] if len(args) > 5 else 1)
        return predict(*args)

    monkeypatch.setattr(inference, "predict_logits", spy)
    code, _, err = run(capsys, "segment", small_path, "-o", tmp_path / "tta.nii.gz", "--model", model_file, "--tta", 4)
    assert code == 0, err
    assert seen == [1, 4]  # the first pass only finds the brain; the full pass reads four mirror views
    code, _, err = run(capsys, "segment", small_path, "-o", tmp_path / "bad.nii.gz", "--model", model_file, "--tta", 3)
    assert code == 2 and "--tta: invalid choice: 3" in err
    assert not (tmp_path / "bad.nii.gz").exists()


def test_segment_smoothing_option(capsys, tmp_path, small_path, model_file, monkeypatch):
    from napari_convlora import inference

    seen, smooth = [], inference.smooth_stack
    monkeypatch.setattr(inference, "smooth_stack", lambda s, g, mm: seen.append(mm) or smooth(s, g, mm))
    for extra, expected in (([], [2.0]), (["--smooth", "0"], []), (["--smooth", "3.5"], [3.5])):
        seen.clear()
        out = tmp_path / "m.nii.gz"
        code, _, err = run(capsys, "segment", small_path, "-o", out, "--model", model_file, "--overwrite", *extra)
        assert code == 0 and seen == expected, err
    code, _, err = run(
        capsys, "segment", small_path, "-o", tmp_path / "n.nii.gz", "--model", model_file, "--smooth", "-1"
    )
    assert code == 2 and "--smooth: must be a number of at least 0" in err and not (tmp_path / "n.nii.gz").exists()


def test_adapt_to_library_then_segment_by_name(capsys, tmp_path, small_path, model_file):
    code, out, err = run(
        capsys,
        "adapt",
        small_path,
        "--name",
        "scanner-a",
        "--model",
        model_file,
        *CONVLORA_QUICK,
        "--json",
    )
    assert code == 0, err
    result = _one_json(out)
    assert {"adapter", "name", "trainable_parameters", "seconds"} <= set(result)
    assert result["name"] == "scanner-a" and result["trainable_parameters"] > 0
    assert Path(result["adapter"]) == tmp_path / "home" / "adapters" / "scanner-a.safetensors"
    code, out, err = run(
        capsys,
        "segment",
        small_path,
        "-o",
        tmp_path / "m.nii.gz",
        "--model",
        model_file,
        "--adapter",
        "scanner-a",
        "--json",
    )
    assert code == 0, err
    assert _one_json(out)["adapter"] == "scanner-a"
    # auto now has a candidate made for this model (on this very scan), scores it and picks it
    code, out, err = run(
        capsys,
        "segment",
        small_path,
        "-o",
        tmp_path / "auto.nii.gz",
        "--model",
        model_file,
        "--adapter",
        "auto",
        "--json",
    )
    assert code == 0, err
    auto = _one_json(out)["auto"]
    assert set(auto["scores"]) == {"source", "scanner-a"} and auto["choice"] == "scanner-a"
    # The same name again is refused rather than overwritten.
    code, _, err = run(capsys, "adapt", small_path, "--name", "scanner-a", "--model", model_file, "--epochs", 1)
    assert code == 2 and "exists" in err


def test_adapt_to_explicit_path(capsys, tmp_path, small_path, model_file):
    target = tmp_path / "a.safetensors"
    code, out, err = run(
        capsys,
        "adapt",
        small_path,
        "-o",
        target,
        "--model",
        model_file,
        *CONVLORA_QUICK,
        "--json",
    )
    assert code == 0, err
    assert Path(_one_json(out)["adapter"]) == target and target.exists()
    code, out, err = run(
        capsys, "segment", small_path, "-o", tmp_path / "m.nii.gz", "--model", model_file, "--adapter", target, "--json"
    )
    assert code == 0, err


def test_adapt_without_adabn_keeps_the_source_statistics(capsys, tmp_path, small_path, model_file):
    from napari_convlora.adapters import load_adapter
    from napari_convlora.model import load_model

    target = tmp_path / "a.safetensors"
    argv = ["adapt", small_path, "-o", target, "--model", model_file, *CONVLORA_QUICK, "--no-adabn"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    adapter = load_adapter(target)
    assert adapter.metadata["adabn"] is False
    base = load_model(model_file).unet.state_dict()
    stats = [k for k in adapter.tensors if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(adapter.tensors[k], base[k]) for k in stats)


def test_adapt_moe_kind_then_segment_with_it(capsys, tmp_path, small_path, model_file):
    from napari_convlora.adapters import load_adapter

    target = tmp_path / "m.safetensors"
    argv = ["adapt", small_path, "-o", target, "--model", model_file, *CONVLORA_QUICK]
    code, out, err = run(capsys, *argv, "--kind", "moe", "--experts", 2, "--json")
    assert code == 0, err
    result = _one_json(out)
    assert result["kind"] == "moe" and result["trainable_parameters"] == load_adapter(target).trainable_parameters
    meta = load_adapter(target).metadata
    assert meta["kind"] == "moe" and meta["experts"] == 2
    code, out, err = run(
        capsys, "segment", small_path, "-o", tmp_path / "m.nii.gz", "--model", model_file, "--adapter", target, "--json"
    )
    assert code == 0, err


def test_adapt_kind_usage_errors(capsys, tmp_path, small_path, model_file):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["adapt", small_path, "-o", out_dir / "a.safetensors", "--model", model_file]
    _expect_input_error(capsys, [*argv, "--experts", "4"], "--experts applies to --kind moe only", out_dir)
    _expect_input_error(capsys, [*argv, "--kind", "lora"], "invalid choice: 'lora'", out_dir)
    _expect_input_error(capsys, [*argv, "--kind", "moe", "--experts", "0"], "whole number of at least 1", out_dir)
    to_library = ["adapt", small_path, "--name", "site-a", "--model", model_file, "--experts", "4"]
    _expect_input_error(capsys, to_library, "--experts applies to --kind moe only")
    assert not (tmp_path / "home").exists()  # refused before the library folder is made


def test_evaluate_json_matches_known_figures(capsys):
    code, out, err = run(capsys, "evaluate", DATA / "colin27_mask_deepbet.nii.gz", SAMPLE_MASK, "--json")
    assert code == 0, err
    result = _one_json(out)
    assert set(result) == {"dice", "surface_dice", "hd95_mm", "tolerance_mm", "volume_ml_pred", "volume_ml_gt"}
    # shared/data/README.md: colin27 deepbet vs consensus, Dice 0.988, surface Dice @ 1 mm 0.924
    assert round(result["dice"], 3) == 0.988 and round(result["surface_dice"], 3) == 0.924
    code, out, _ = run(capsys, "evaluate", DATA / "colin27_mask_deepbet.nii.gz", SAMPLE_MASK)
    assert code == 0 and "surface Dice @ 1 mm 0.9236" in out


# --- bad input: exit 2, one line "error: ...", no output left behind ---------------------------


def _expect_input_error(capsys, argv, needle: str, leftover_dir: Path | None = None):
    before = sorted(os.listdir(leftover_dir)) if leftover_dir else None
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    if leftover_dir is not None:
        assert sorted(os.listdir(leftover_dir)) == before


def _bad_inputs(tmp: Path, small_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    files = {}
    (tmp / "text.nii.gz").write_bytes(gzip.compress(b"not an image " * 40))
    files["not nifti"] = (tmp / "text.nii.gz", "text.nii.gz")
    raw = small_path.read_bytes()
    (tmp / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = (tmp / "cut.nii.gz", "truncated")
    for name, data, needle in [
        ("flat.nii", rng.random((30, 30)).astype(np.float32), "2D"),
        ("series.nii", rng.random((12, 12, 12, 4)).astype(np.float32), "4D series"),
        ("zeros.nii", np.zeros((12, 12, 12), np.float32), "constant"),
    ]:
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp / name))
        files[name] = (tmp / name, needle)
    nan = rng.random((12, 12, 12)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp / "nan.nii"))
    files["nan"] = (tmp / "nan.nii", "NaN or Inf")
    fixed = rng.random((12, 12, 12)).astype(np.float32).tobytes()
    for name, value in (("zero voxel", 0.0), ("negative voxel", -1.0)):
        raw = bytearray((tmp / "nan.nii").read_bytes())
        raw[80:84] = np.float32(value).tobytes()  # pixdim[1]
        path = tmp / f"{name.replace(' ', '_')}.nii"
        path.write_bytes(bytes(raw[: len(raw) - len(fixed)]) + fixed)
        files[name] = (path, "voxel sizes must be positive")
    files["missing"] = (tmp / "absent.nii.gz", "no such file")
    return files


@pytest.mark.parametrize(
    "case", ["not nifti", "truncated", "flat.nii", "series.nii", "zeros.nii", "nan", "zero voxel", "missing"]
)
def test_segment_and_adapt_refuse_bad_volumes(capsys, tmp_path, small_path, model_file, case):
    bad = tmp_path / "bad"
    bad.mkdir()
    path, needle = _bad_inputs(bad, small_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _expect_input_error(capsys, ["segment", path, "-o", out_dir / "m.nii.gz", "--model", model_file], needle, out_dir)
    _expect_input_error(
        capsys, ["adapt", path, "-o", out_dir / "a.safetensors", "--model", model_file], needle, out_dir
    )
    _expect_input_error(capsys, ["evaluate", path, SAMPLE_MASK], needle if case != "zeros.nii" else "grid")


def test_evaluate_refuses_a_ground_truth_on_another_grid(capsys, tmp_path):
    gt = nib.load(str(SAMPLE_MASK))
    shifted = nib.Nifti1Image(np.asarray(gt.dataobj), gt.affine @ np.diag([1.0, 1.0, 1.2, 1.0]))
    nib.save(shifted, str(tmp_path / "other.nii.gz"))
    _expect_input_error(capsys, ["evaluate", SAMPLE_MASK, tmp_path / "other.nii.gz"], "same voxel grid")


def test_refuses_an_adapter_made_for_another_base_model(capsys, tmp_path, small_path, model_file):
    other = tmp_path / "other_model.safetensors"
    save_model(make_model(4, seed=9), other)
    code, _, err = run(
        capsys,
        "adapt",
        small_path,
        "-o",
        tmp_path / "a.safetensors",
        "--model",
        other,
        *CONVLORA_QUICK,
    )
    assert code == 0, err
    _expect_input_error(
        capsys,
        [
            "segment",
            small_path,
            "-o",
            tmp_path / "m.nii.gz",
            "--model",
            model_file,
            "--adapter",
            tmp_path / "a.safetensors",
        ],
        "adapter made for base model",
        tmp_path,
    )


def test_refuses_outputs_that_cannot_be_written(capsys, tmp_path, small_path, model_file):
    _expect_input_error(
        capsys,
        ["segment", small_path, "-o", tmp_path / "nowhere" / "m.nii.gz", "--model", model_file],
        "does not exist",
    )
    (tmp_path / "file").write_text("x")
    _expect_input_error(
        capsys, ["segment", small_path, "-o", tmp_path / "file" / "m.nii.gz", "--model", model_file], "not a folder"
    )
    _expect_input_error(
        capsys, ["segment", small_path, "-o", small_path, "--model", model_file, "--overwrite"], "overwrite the input"
    )
    _expect_input_error(
        capsys, ["segment", small_path, "-o", tmp_path / "m.png", "--model", model_file], ".nii or .nii.gz"
    )
    if os.geteuid() != 0:  # root writes anywhere; the check is then done by the write itself
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        _expect_input_error(
            capsys, ["segment", small_path, "-o", locked / "m.nii.gz", "--model", model_file], "not writable"
        )


def test_unknown_adapter_model_and_usage_errors(capsys, tmp_path, small_path, model_file):
    out = tmp_path / "m.nii.gz"
    _expect_input_error(
        capsys,
        ["segment", small_path, "-o", out, "--model", model_file, "--adapter", "nope"],
        "no adapter named 'nope'",
    )
    _expect_input_error(
        capsys, ["segment", small_path, "-o", out, "--model", tmp_path / "absent.safetensors"], "no such file"
    )
    _expect_input_error(capsys, ["segment", small_path], "required")
    _expect_input_error(capsys, ["adapt", small_path, "--epochs", "many"], "whole number of at least 1, got 'many'")
    _expect_input_error(capsys, ["frobnicate"], "invalid choice")
    _expect_input_error(capsys, ["evaluate", SAMPLE_MASK, SAMPLE_MASK, "--tolerance", "-1"], "positive")


def test_internal_errors_exit_1_without_traceback(capsys, monkeypatch, small_path, tmp_path, model_file):
    import napari_convlora.inference as inference

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(inference, "segment", boom)
    code, _out, err = run(capsys, "segment", small_path, "-o", tmp_path / "m.nii.gz", "--model", model_file)
    assert code == 1 and "internal error" in err and "simulated failure" in err and "Traceback" not in err
    assert not (tmp_path / "m.nii.gz").exists()


def test_console_script_runs_as_a_process(tmp_path, small_path, model_file):
    """The installed entry point, as a pipeline calls it: exit codes and stdout JSON."""
    exe = Path(sys.executable).parent / "convlora"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "napari_convlora.cli"]
    env = {**os.environ, "CONVLORA_HOME": str(tmp_path / "home")}
    ok = subprocess.run(
        [*command, "evaluate", SAMPLE_MASK, SAMPLE_MASK, "--json"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["dice"] == 1.0
    bad = subprocess.run(
        [*command, "segment", tmp_path / "absent.nii", "-o", tmp_path / "m.nii.gz", "--model", model_file],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stdout == ""
    # segment ends its process without the interpreter's teardown: what it printed, block-buffered into a pipe,
    # must still arrive whole
    buffered = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [*command, "segment", small_path, "-o", tmp_path / "m.nii.gz", "--model", model_file, "--json"],
        capture_output=True,
        text=True,
        env=buffered,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(tmp_path / "m.nii.gz")
    assert load_mask(tmp_path / "m.nii.gz").data.any()


def test_more_usage_errors_stay_one_line(capsys, tmp_path, small_path, model_file, monkeypatch):
    _expect_input_error(capsys, ["adapt", small_path, "--seed", "-1"], "2**32")
    _expect_input_error(
        capsys, ["segment", small_path, "-o", tmp_path / "m.png", "--model", model_file, "--adapter", "auto"], ".nii"
    )
    (tmp_path / "home_file").write_text("not a folder")
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home_file"))
    _expect_input_error(capsys, ["adapt", small_path, "--model", model_file], "adapter library folder")


def test_train_source_refuses_clobbering_its_inputs_or_itself(capsys, tmp_path, small_path, small_mask_path):
    out = tmp_path / "m.safetensors"
    head = ["--head", small_path, small_mask_path]
    _expect_input_error(capsys, ["train-source", *head, "-o", out, "--checkpoint", out], "cannot be the output")
    _expect_input_error(capsys, ["train-source", *head, "-o", tmp_path / "m.pt"], ".safetensors")
    _expect_input_error(capsys, ["train-source", *head, "-o", out, "--checkpoint", small_mask_path], "--head inputs")
    _expect_input_error(capsys, ["train-source", *head, "-o", out, "--contrast-curves", "1.5"], "from 0 to 1")
    bogus = tmp_path / "bogus.checkpoint"
    bogus.write_bytes(b"\x00" * 64)
    _expect_input_error(
        capsys, ["train-source", *head, "-o", out, "--checkpoint", bogus, "--steps", "1", "--width", "4"], "checkpoint"
    )
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_command_keeps_freed_memory_for_its_next_arrays():
    """The console command's process keeps a freed 50 MB array's memory (no fresh page faults for the next one)."""
    code = (
        "import os, sys, numpy as np\n"
        "from napari_convlora.cli import keep_freed_memory\n"
        "if sys.argv[1] == 'keep':\n"
        "    keep_freed_memory()\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "before = rss()\n"
        "a = np.ones(50_000_000 // 8)\n"
        "del a\n"
        "print(rss() - before)\n"
    )
    kept = int(subprocess.check_output([sys.executable, "-c", code, "keep"], text=True))
    given_back = int(subprocess.check_output([sys.executable, "-c", code, "default"], text=True))
    assert kept > 40e6 and given_back < 10e6, (kept, given_back)
