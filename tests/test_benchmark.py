"""`convlora benchmark --quick`: every method runs, the table adds up, a stopped run resumes, nothing is clobbered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_convlora import benchmark as bench
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.intensity_curve import KNOTS
from napari_convlora.model import load_model, save_model
from napari_convlora.nifti import load_mask, load_volume

from .conftest import with_scanner_reference


@pytest.fixture(scope="module")
def referenced_model(tmp_path_factory, model_file, small_volume):
    """The tiny model with a scanner reference: every method can run."""
    return with_scanner_reference(model_file, tmp_path_factory.mktemp("referenced") / "tiny.safetensors", small_volume)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_path, small_mask_path, referenced_model):
    out = tmp_path_factory.mktemp("bench")
    args = ["benchmark", "--quick", "--t1", str(small_path), "--mask", str(small_mask_path)]
    args += ["--model", str(referenced_model), "-o", str(out / "results.json"), "--markdown", str(out / "table.md")]
    args += ["--lr", "0.001"]  # the model is untrained: a few steps must show what labels buy
    assert main([*args, "--json"]) == 0
    return out, args


def test_quick_benchmark_runs_every_method_on_source_and_one_target(quick_run, capsys):
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    assert result["simulated"] is True
    assert result["profiles"] == ["ge-3t", "philips-3t"]
    cells = result["cells"]
    assert {(c["profile"], c["method"]) for c in cells} == {
        (p, m) for p in ("ge-3t", "philips-3t") for m in bench.METHODS
    }
    by = {(c["profile"], c["method"]): c for c in cells}
    # Untrained tiny model: what labels buy must show (the oracle trains on the true mask).
    assert by["philips-3t", "oracle"]["dice"] > by["philips-3t", "source"]["dice"]
    assert by["ge-3t", "source"]["trainable_parameters"] == 0
    assert by["ge-3t", "adabn"]["trainable_parameters"] == 0
    assert 0 < by["ge-3t", "udas"]["trainable_parameters"] < by["ge-3t", "convlora"]["trainable_parameters"]
    assert by["ge-3t", "convlora"]["trainable_parameters"] < by["ge-3t", "full-ft"]["trainable_parameters"]
    # MoE adapters: a smaller B (1x1) than ConvLoRA's, plus 8 experts and a gate per layer
    assert by["ge-3t", "moe"]["trainable_parameters"] == by["ge-3t", "moe+adabn"]["trainable_parameters"] > 0
    assert by["ge-3t", "moe"]["trainable_parameters"] != by["ge-3t", "convlora"]["trainable_parameters"]
    # the curve: its knots are what it trains, and it records how near it brought the scan to the reference
    curve = by["philips-3t", "curve"]
    assert curve["trainable_parameters"] == KNOTS and curve["distance"] <= curve["source_distance"]
    # adapt's default: one of the masks --standardize auto compares, read through the adapter's map
    intensity = by["philips-3t", "intensity"]
    candidates = [by["philips-3t", m]["surface_dice"] for m in ("source", "standardize", "standardize-brain")]
    assert intensity["adapt_seconds"] > 0 and intensity["trainable_parameters"] >= 1
    if intensity["distance"] is None:  # a landmark map or none was kept, not the curve
        assert min(abs(intensity["surface_dice"] - c) for c in candidates) <= 0.005
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| profile | gap | source | adabn |")
    assert "| philips-3t |" in table and "trainable parameters" in table
    summary = result["summary"]
    expected_gap = by["ge-3t", "source"]["surface_dice"] - by["philips-3t", "source"]["surface_dice"]
    assert summary["gap"]["philips-3t"] == pytest.approx(expected_gap)


def test_rerun_resumes_without_recomputing(quick_run, capsys):
    out, args = quick_run
    before = json.loads((out / "results.json").read_text())["cells"]
    capsys.readouterr()
    assert main(args) == 0
    assert "[" not in capsys.readouterr().err  # no cell was run again
    assert json.loads((out / "results.json").read_text())["cells"] == before


def test_other_settings_refuse_to_replace_results(quick_run, capsys):
    out, args = quick_run
    text = (out / "results.json").read_text()
    assert main([*args, "--lr", "0.0005"]) == 2
    assert "not a benchmark run with these settings" in capsys.readouterr().err
    assert (out / "results.json").read_text() == text


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--methods", "magic"], "unknown method"), (["--profiles", "nope"], "unknown profile")],
)
def test_bad_arguments_exit_2(tmp_path, extra, message, capsys):
    assert main(["benchmark", "-o", str(tmp_path / "r.json"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_brain_step_needs_a_model_with_brain_landmarks(tmp_path, small_path, small_mask_path, model_file, capsys):
    from napari_convlora.standardize import METADATA_KEY

    older = load_model(model_file)
    older.metadata[METADATA_KEY] = {k: v for k, v in older.metadata[METADATA_KEY].items() if not k.startswith("brain")}
    save_model(older, tmp_path / "older.safetensors")
    args = ["benchmark", "--quick", "--t1", str(small_path), "--mask", str(small_mask_path), "--methods"]
    args += ["standardize-brain", "--model", str(tmp_path / "older.safetensors"), "-o", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no brain intensity landmarks" in err and "older.safetensors" in err and not (tmp_path / "r.json").exists()


def test_central_slab_keeps_world_coordinates(small_path, small_mask_path):
    volume, mask = load_volume(small_path), load_mask(small_mask_path)
    slab, slab_mask = bench.central_slab(volume, mask, 24.0)
    assert slab.data.shape[0] == 6 and slab.data.shape[1:] == volume.data.shape[1:]
    first = (volume.data.shape[0] - 6) // 2
    assert (slab.data == volume.data[first : first + 6]).all()
    # voxel (0, 0, 0) of the slab is voxel (first, 0, 0) of the head, in the same world place
    assert slab.affine[:3, 3] == pytest.approx(volume.affine[:3, :3] @ [first, 0, 0] + volume.affine[:3, 3])
    assert (slab_mask.affine == slab.affine).all()


def _cell(profile: str, seed: int, method: str, surface_dice: float) -> bench.Cell:
    return bench.Cell(profile, seed, method, surface_dice, 0.9, 5.0, 0, 0.0)


def test_recovery_counts_only_profiles_with_a_real_gap():
    # ge-3t in-domain 0.8; philips-3t loses 0.4 (a gap), philips-1.5t only 0.005 (noise, not a gap)
    cells = [_cell("ge-3t", s, "source", 0.8) for s in (0, 1)]
    cells += [_cell("philips-3t", s, "source", 0.4) for s in (0, 1)]
    cells += [_cell("philips-3t", s, "convlora+adabn", v) for s, v in ((0, 0.5), (1, 0.7))]
    cells += [_cell("philips-1.5t", s, "source", 0.795) for s in (0, 1)]
    cells += [_cell("philips-1.5t", s, "convlora+adabn", 0.755) for s in (0, 1)]
    summary = bench.summarise(cells)
    assert summary["gap"] == pytest.approx({"philips-3t": 0.4, "philips-1.5t": 0.005})
    # (0.6 - 0.4) / 0.4 on philips-3t alone; philips-1.5t's -0.04 / 0.005 = -800% must not count
    assert summary["recovery"]["convlora+adabn"] == pytest.approx(0.5)
    assert summary["table"]["philips-3t"]["convlora+adabn"]["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert "| recovered share of the gap (gap >= 0.10) | | 0% | 50% |" in bench.markdown(summary)


def test_quick_benchmark_records_label_free_scores_and_summarises_gate_and_criteria(quick_run):
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    cells = result["cells"]
    assert all(0.0 <= c["score"] <= 1.0 and 0.0 <= c["source_score"] <= 1.0 for c in cells)
    assert len({c["source_score"] for c in cells if c["profile"] == "philips-3t"}) == 1  # one source score per scan
    assert all(0.0 <= c["agreement"] <= 1.0 and 0.0 <= c["source_agreement"] <= 1.0 for c in cells)
    assert all(c["agreement"] == c["source_agreement"] for c in cells if c["method"] == "source")
    assert set(result["summary"]["gate"]) == {"score", "agreement", "confidence"}
    assert all(0.0 <= c["confidence"] <= 1.0 and c["source_confidence"] is not None for c in cells)
    assert set(result["summary"]["gate"]["score"]) == set(bench.METHODS) - {"source"}
    assert set(result["summary"]["criteria"]) == {"score", "agreement", "confidence"}
    assert "Do-no-harm gate" in (out / "table.md").read_text()


def _scored_cell(profile, seed, method, surface_dice, score, source_score):
    return bench.Cell(profile, seed, method, surface_dice, 0.9, 5.0, 0, 1.0, score, source_score, None)


def test_gate_summary_keeps_the_source_where_the_score_did_not_improve():
    cells = []
    for seed in (0, 1):
        cells += [
            _scored_cell("ge-3t", seed, "source", 0.90, 0.80, 0.80),
            _scored_cell("siemens-3t", seed, "source", 0.60, 0.70, 0.70),
            _scored_cell("siemens-3t", seed, "stats", 0.75, 0.80, 0.70),  # helps, and the score says so
            _scored_cell("ge-3t", seed, "stats", 0.85, 0.79, 0.80),  # hurts, the score fell: the gate refuses it
            _scored_cell("stress-inverted", seed, "source", 0.10, 0.5, 0.5),
            _scored_cell("stress-inverted", seed, "stats", 0.00, 0.9, 0.5),  # a stress cell: out of every headline
        ]
    summary = bench.summarise(cells)
    gate = summary["gate"]["score"]["stats"]
    assert summary["gate"]["agreement"] == {}  # no agreement recorded in these cells
    assert gate["cells"] == 4 and gate["accepted"] == 2
    assert gate["worst_without_gate"] == pytest.approx(-0.05) and gate["worst_with_gate"] == pytest.approx(0.0)
    assert gate["recovery_with_gate"] == pytest.approx(0.5)  # siemens-3t: +0.15 of a 0.30 gap
    assert summary["recovery"]["stats"] == pytest.approx(0.5)  # the stress profile's gap is not averaged in
    criteria = summary["criteria"]["score"]
    assert criteria["gain"] == pytest.approx(1.0) and criteria["cells"] == 8


def test_without_a_scanner_reference_the_default_leaves_out_the_methods_that_need_one(
    model_file, referenced_model, small_volume
):
    plain = bench.default_methods(load_model(model_file))
    assert "curve" not in plain and "reference" not in plain and "stats" in plain and "source" in plain
    assert bench.default_methods(load_model(referenced_model)) == list(bench.METHODS)
    with pytest.raises(InputError, match=r"carries no scanner reference.*curve"):
        next(bench.run_benchmark(load_model(model_file), small_volume, small_volume, ["ge-3t"], [0], ["curve"]))
