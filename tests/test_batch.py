"""``convlora batch``: planning a cohort, and real runs on dask.distributed.

The cluster tests start a real ``dask scheduler`` and two ``dask worker``
processes on loopback, as a user of a cluster would, and run the CLI against
them with a tiny random model on the 4 mm sample head (seconds per scan).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_convlora.batch import RESULTS_CSV, plan_scans
from napari_convlora.cli import main
from napari_convlora.errors import InputError
from napari_convlora.inference import segment
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume

distributed = pytest.importorskip("distributed")


def _rows(outdir: Path) -> list[dict]:
    with (outdir / RESULTS_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def cohort(tmp_path, small_path, small_mask_path) -> tuple[Path, Path]:
    """Three copies of the 4 mm head, one broken file, and a ground truth for one of them."""
    scans, gts = tmp_path / "scans", tmp_path / "gts"
    scans.mkdir()
    gts.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(small_path, scans / f"{name}.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    (scans / "notes.txt").write_text("not a scan")
    shutil.copy(small_mask_path, gts / "a.nii.gz")
    return scans, gts


def test_plan_from_a_folder_a_glob_and_a_csv(cohort, tmp_path):
    scans, gts = cohort
    out = tmp_path / "out"
    planned = plan_scans(str(scans), out, "none", gt_dir=gts)
    assert [Path(s.input).name for s in planned] == ["a.nii.gz", "b.nii.gz", "broken.nii.gz", "c.nii.gz"]
    assert Path(planned[0].output).name == "a_mask.nii.gz"
    assert planned[0].gt == str(gts / "a.nii.gz") and planned[1].gt is None
    assert len(plan_scans(str(scans / "[ab].nii.gz"), out)) == 2
    table = tmp_path / "cohort.csv"
    table.write_text("input,gt,adapter\nscans/a.nii.gz,gts/a.nii.gz,auto\nscans/b.nii.gz,,\n")
    from_csv = plan_scans(str(table), out, "none")
    assert from_csv[0].gt == str(tmp_path / "gts" / "a.nii.gz") and from_csv[0].adapter == "auto"
    assert from_csv[1].gt is None and from_csv[1].adapter == "none"
    assert plan_scans(None, out, "none", csv_file=table) == from_csv


def test_plan_refuses_what_cannot_run(cohort, tmp_path):
    scans, _ = cohort
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no such folder"):
        plan_scans(str(tmp_path / "missing"), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI scans"):
        plan_scans(str(tmp_path / "empty"), out)
    shutil.copy(scans / "a.nii.gz", scans / "a.nii")
    with pytest.raises(InputError, match="same name"):
        plan_scans(str(scans), out)
    # the same file name in several folders: the folders name the masks
    names = [Path(s.output).name for s in plan_scans(str(tmp_path / "*" / "a.nii.gz"), out)]
    assert names == ["gts_a_mask.nii.gz", "scans_a_mask.nii.gz"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,gt\nx.nii.gz,\n")
    with pytest.raises(InputError, match="'input' column"):
        plan_scans(str(bad), out)


@pytest.fixture
def dask_cluster(tmp_path):
    """A real scheduler and two workers (no nanny: killing one kills the worker) on loopback."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    common = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        **common,
    )  # fmt: skip
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{i}",
            ],
            **common,
        )
        for i in range(2)
    ]
    with distributed.Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=120)
    yield address, workers
    for process in [*workers, scheduler]:
        if process.poll() is None:
            process.terminate()
    for process in [*workers, scheduler]:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_batch_on_a_dask_cluster_records_every_scan_and_resumes(
    dask_cluster, cohort, tmp_path, model_file, small_path, small_mask_path, capsys
):
    address, _ = dask_cluster
    scans, gts = cohort
    out = tmp_path / "out"
    argv = ["batch", str(scans), "-o", str(out), "--gt-dir", str(gts), "--model", str(model_file)]
    argv += ["--scheduler", address, "--threads-per-worker", "1", "--json"]
    assert main(argv) == 2  # one scan failed: recorded, the others ran
    result = json.loads(capsys.readouterr().out)
    assert (result["scans"], result["ran"], result["ok"], result["failed"]) == (4, 4, 3, 1)
    rows = {Path(r["input"]).name: r for r in _rows(out)}
    assert rows["broken.nii.gz"]["status"] == "error" and "broken.nii.gz" in rows["broken.nii.gz"]["error"]
    assert not (out / "broken_mask.nii.gz").exists()
    expected = segment(load_model(model_file), load_volume(small_path), device="cpu").mask
    for name in ("a", "b", "c"):
        assert rows[f"{name}.nii.gz"]["status"] == "ok"
        np.testing.assert_array_equal(load_mask(out / f"{name}_mask.nii.gz").data, expected)
    assert len({rows[f"{n}.nii.gz"]["worker"] for n in "abc"}) >= 1
    from napari_convlora.metrics import evaluate

    gt = load_mask(small_mask_path)
    assert float(rows["a.nii.gz"]["dice"]) == pytest.approx(
        evaluate(expected, gt.data > 0, gt.spacing)["dice"], abs=1e-4
    )
    assert rows["b.nii.gz"]["dice"] == ""  # no ground truth for b
    import pandas as pd

    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 4 and frame["dice"].notna().sum() == 1
    # the same command again: the three done scans are skipped, only the broken one runs (and fails) again
    assert main(argv) == 2
    again = json.loads(capsys.readouterr().out)
    assert (again["skipped_done"], again["ran"], again["failed"]) == (3, 1, 1)


def test_killing_a_worker_mid_run_loses_no_scan_and_the_rerun_completes(
    dask_cluster, tmp_path, small_path, model_file, capsys
):
    address, workers = dask_cluster
    scans = tmp_path / "many"
    scans.mkdir()
    for i in range(16):
        shutil.copy(small_path, scans / f"s{i:02d}.nii.gz")
    out = tmp_path / "out"
    argv = ["batch", str(scans), "-o", str(out), "--model", str(model_file), "--scheduler", address]
    argv += ["--threads-per-worker", "1", "--json"]
    status: list[int] = []
    run = threading.Thread(target=lambda: status.append(main(argv)))
    run.start()
    deadline = time.time() + 120
    while not ((out / RESULTS_CSV).exists() and len(_rows(out)) >= 1) and time.time() < deadline:
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)  # mid-run: at least one scan done, most still to go
    run.join(300)
    assert status == [0]
    first = json.loads(capsys.readouterr().out)
    rows = _rows(out)
    assert first["ok"] == 16 and len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    assert len(list(out.glob("*_mask.nii.gz"))) == 16
    assert main(argv) == 0  # the rerun completes: nothing left to do
    again = json.loads(capsys.readouterr().out)
    assert (again["skipped_done"], again["ran"]) == (16, 0)


def test_batch_with_a_local_cluster_and_bad_arguments(tmp_path, small_path, model_file, capsys, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(small_path, scans / "x.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x_mask.nii.gz").write_bytes(b"someone's file")
    argv = ["batch", str(scans), "-o", str(out), "--model", str(model_file), "--workers", "1", "--json"]
    assert main(argv) == 2  # a folder no run of ours wrote: its files are never replaced unasked
    assert "x_mask.nii.gz: already exists" in capsys.readouterr().err
    assert (out / "x_mask.nii.gz").read_bytes() == b"someone's file"
    assert main([*argv, "--overwrite", "--threads-per-worker", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 1
    assert load_mask(out / "x_mask.nii.gz").data.shape == load_volume(small_path).data.shape
    assert main(["batch", str(scans), "-o", str(out), "--scheduler", "tcp://127.0.0.1:9", "--json"]) == 0  # all done
    monkeypatch.setattr("napari_convlora.batch.CONNECT_TIMEOUT", "2s")
    assert main(["batch", str(scans), "-o", str(tmp_path / "o2"), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the dask scheduler" in capsys.readouterr().err


@pytest.mark.parametrize("adapter", ["adapt", "auto", "none"])
@pytest.mark.parametrize("tta", [1, 2])
def test_one_scan_with_each_adapter_choice(tmp_path, small_path, model_file, monkeypatch, adapter, tta):
    """A task as a worker runs it (no cluster): adapt keeps an accepted adapter, auto names its pick; --tta counts."""
    from napari_convlora import inference
    from napari_convlora.batch import Scan, process_scan

    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path / "home"))
    seen, predict = [], inference.predict_logits
    monkeypatch.setattr(inference, "predict_logits", lambda *a: seen.append(a[5] if len(a) > 5 else 1) or predict(*a))
    scan = Scan("head4mm", str(small_path), str(tmp_path / "m.nii.gz"), None, adapter)
    row = process_scan(scan, str(model_file), "cpu", 1, str(tmp_path / "adapters"), tta)
    assert row["status"] == "ok", row["error"]
    assert (2 in seen) == (tta == 2)  # the kept model's mask is made with the mirror views asked for
    assert load_mask(tmp_path / "m.nii.gz").data.shape == load_volume(small_path).data.shape
    if adapter == "adapt":  # the tiny random model's gate may go either way; both are answers
        kept = row["adapter"] != "none (adaptation refused by the gate)"
        assert kept == (tmp_path / "adapters" / "head4mm.safetensors").is_file()
    elif adapter == "auto":
        assert row["adapter"].startswith("auto: ")  # the built-ins are for the shipped model: skipped here
    bad = Scan("head4mm", str(small_path), str(tmp_path / "n.nii.gz"), None, "no-such-adapter")
    row = process_scan(bad, str(model_file), "cpu", 1, str(tmp_path / "adapters"))
    assert row["status"] == "error" and "no-such-adapter" in row["error"] and not (tmp_path / "n.nii.gz").exists()


@pytest.mark.parametrize("standardize", ["off", "on", "auto"])
def test_one_scan_standardised(tmp_path, small_path, model_file, monkeypatch, standardize):
    """--standardize: the scan is read standardised as asked (auto: as it is, the head step, the brain step too),
    and the row says whether the mask kept is a standardised one."""
    from napari_convlora import inference
    from napari_convlora.batch import Scan, process_scan
    from napari_convlora.inference import run_to_end
    from napari_convlora.selection import iter_plain_and_standardized

    seen, plan = [], inference.plan

    def spy(volume, scaling, reference=None, brain=None, curve=None):
        seen.append((reference is not None, brain is not None))
        return plan(volume, scaling, reference, brain, curve)

    monkeypatch.setattr(inference, "plan", spy)
    scan = Scan("head4mm", str(small_path), str(tmp_path / "m.nii.gz"), None, "none")
    row = process_scan(scan, str(model_file), "cpu", 1, str(tmp_path / "adapters"), 1, standardize)
    assert row["status"] == "ok", row["error"]
    runs = {"off": [(False, False)], "on": [(True, False)], "auto": [(False, False), (True, False), (True, True)]}
    assert seen == runs[standardize]
    base, volume = load_model(model_file), load_volume(small_path)
    if standardize == "auto":
        choice = run_to_end(iter_plain_and_standardized(base, volume, device="cpu"))
        kept, standardized = choice.kept.mask, choice.is_standardized
    else:
        kept, standardized = (
            segment(base, volume, device="cpu", standardize=standardize == "on").mask,
            standardize == "on",
        )
    assert row["standardized"] is standardized
    assert np.array_equal(load_mask(tmp_path / "m.nii.gz").data, kept)


def test_standardize_choices_that_cannot_run_are_refused(tmp_path, small_path, model_file, capsys):
    from napari_convlora.batch import Scan, process_scan

    scan = Scan("head4mm", str(small_path), str(tmp_path / "m.nii.gz"), None, "adapt")
    row = process_scan(scan, str(model_file), "cpu", 1, str(tmp_path / "adapters"), 1, "auto")
    assert row["status"] == "error" and "--standardize auto and --adapter adapt" in row["error"]
    assert not (tmp_path / "m.nii.gz").exists()
    argv = ["batch", str(small_path), "-o", str(tmp_path / "out"), "--adapter", "auto", "--standardize", "auto"]
    assert main(argv) == 2  # before any cluster starts
    err = capsys.readouterr().err
    assert "--standardize auto and --adapter auto" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_table_begun_by_an_older_version_keeps_its_columns(tmp_path):
    """Rows appended to a results.csv without the standardized column stay aligned; Parquet reads both."""
    pytest.importorskip("pyarrow")
    import pandas as pd

    from napari_convlora.batch import COLUMNS, ResultsTable

    old = [c for c in COLUMNS if c != "standardized"]
    first = ",".join("1" if c == "seconds" else "" for c in old)
    (tmp_path / RESULTS_CSV).write_text(",".join(old) + "\n" + first + "\n")
    table = ResultsTable(tmp_path)
    table.append({"input": "b", "output": "b_mask", "status": "ok", "seconds": 2.5, "standardized": True})
    rows = _rows(tmp_path)
    assert list(rows[1]) == old and rows[1]["input"] == "b" and rows[1]["seconds"] == "2.5"
    frame = pd.read_parquet(table.write_parquet())
    assert frame["seconds"].tolist() == [1.0, 2.5] and frame["standardized"].isna().all()
    new = tmp_path / "new"
    new.mkdir()
    ResultsTable(new).append({"input": "c", "standardized": True})
    assert pd.read_parquet(ResultsTable(new).write_parquet())["standardized"].tolist() == [True]


def test_adapting_per_scan_chooses_the_standardisation_itself(tmp_path, small_path, model_file):
    """--adapter adapt makes an intensity adapter (adapt's default), which chooses the standardisation: asking for
    one as well is refused for the scan, and no mask or adapter is written."""
    from napari_convlora.batch import Scan, process_scan

    scan = Scan("head4mm", str(small_path), str(tmp_path / "m.nii.gz"), None, "adapt")
    row = process_scan(scan, str(model_file), "cpu", 1, str(tmp_path / "adapters"), 1, "on")
    assert row["status"] == "error" and "adapting chooses the standardisation itself" in row["error"]
    assert not (tmp_path / "m.nii.gz").exists() and not (tmp_path / "adapters").exists()
