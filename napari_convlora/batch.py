"""A cohort in one command: every scan segmented (or adapted to, then segmented) on dask.distributed.

The plan (:func:`plan_scans`) turns a folder, a glob or a CSV into one
:class:`Scan` per input, each with its output name fixed up front. Each scan
is one task (:func:`process_scan`) run on a dask worker, which loads the base
model once (a per-process cache) and never raises: a scan that fails becomes a
row with its one-line error, and the others go on. The client process alone
writes the results table, one row appended as each scan finishes, so a killed
run keeps every finished row; a rerun of the same command reads the table and
skips the scans already done (their mask still on disk). Masks are written
atomically: a killed worker leaves no half-written mask under the real name,
and dask runs its lost tasks again on the other workers.
"""

from __future__ import annotations

import csv
import glob
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from .errors import InputError
from .nifti import NIFTI_SUFFIXES, nifti_stem
from .standardize import MODES

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
CONNECT_TIMEOUT = "30s"  # how long to try reaching a --scheduler address
ADAPTER_CHOICES_HELP = "none, auto, a library name or file, or adapt (adapt to each scan, with the do-no-harm gate)"
COLUMNS = (
    "input", "output", "status", "error", "adapter", "seconds", "volume_ml",
    "gt", "dice", "surface_dice", "hd95_mm", "worker", "standardized",
)  # fmt: skip


@dataclass(frozen=True)
class Scan:
    """One input of the cohort: its unique name, where its mask goes, its ground truth if any, its adapter choice."""

    name: str  # from its path below the inputs' common folder: names its mask and, with --adapter adapt, its adapter
    input: str
    output: str
    gt: str | None
    adapter: str


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _scan_name(path: Path, base: Path) -> str:
    """The scan's path below the inputs' common folder, "/" as "_", without its suffix: unique, and readable.

    A flat folder gives the file's own stem (``sub-01_T1w``); ``heads/*/t1.nii.gz`` gives ``colin27_t1``.
    """
    relative = path.resolve().relative_to(base)
    return "_".join([*relative.parent.parts, nifti_stem(relative)])


def _csv_rows(path: Path) -> list[tuple[Path, Path | None, str | None]]:
    """(input, gt, adapter) per row of a CSV with the columns input[,gt][,adapter]; relative to the CSV's folder."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "input" not in reader.fieldnames:
                raise InputError(f"{path}: a CSV of scans needs an 'input' column (and optionally gt, adapter)")
            unknown = set(reader.fieldnames) - {"input", "gt", "adapter"}
            if unknown:
                raise InputError(f"{path}: unknown column(s) {', '.join(sorted(unknown))}; use input, gt, adapter")
            rows = []
            for line, row in enumerate(reader, start=2):
                if not (row.get("input") or "").strip():
                    raise InputError(f"{path}: line {line} has no input")
                gt = (row.get("gt") or "").strip()
                adapter = (row.get("adapter") or "").strip()
                rows.append((path.parent / row["input"].strip(), path.parent / gt if gt else None, adapter or None))
            return rows
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({exc})") from None


def plan_scans(
    inputs: str | None, outdir: Path, adapter: str = "none", gt_dir: Path | None = None, csv_file: Path | None = None
) -> list[Scan]:
    """The scans of ``inputs`` (a folder, a glob, or a .csv) or of ``csv_file``, each with its output name.

    With ``gt_dir`` a scan's ground truth is the file of the same name there, if
    it exists. A CSV may give each scan its own gt and adapter. Two inputs whose
    masks would get the same name are refused before anything runs.
    """
    if (inputs is None) == (csv_file is None):
        raise InputError("give the scans either as INPUTS (a folder, a glob or a .csv) or with --csv, not both")
    if csv_file is None and inputs is not None and inputs.lower().endswith(".csv"):
        csv_file = Path(inputs)
    if csv_file is not None:
        if not csv_file.is_file():
            raise InputError(f"{csv_file}: no such CSV file")
        entries = _csv_rows(csv_file)
    else:
        if Path(inputs).is_dir():
            files = sorted(p for p in Path(inputs).iterdir() if p.is_file() and _is_nifti(p))
        elif any(c in inputs for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(inputs, recursive=True) if _is_nifti(Path(p)))
        elif Path(inputs).is_file():
            files = [Path(inputs)]
        else:
            raise InputError(f"{inputs}: no such folder, file or glob match")
        entries = [(path, None, None) for path in files]
    if not entries:
        raise InputError(f"{inputs or csv_file}: no NIfTI scans (.nii, .nii.gz) found")
    scans, owners = [], {}
    base = Path(os.path.commonpath([str(path.resolve().parent) for path, _, _ in entries]))
    for path, gt, own_adapter in entries:
        if gt is None and gt_dir is not None and (gt_dir / path.name).is_file():
            gt = gt_dir / path.name
        name = _scan_name(path, base)
        output = outdir / f"{name}_mask.nii.gz"
        if output in owners:
            raise InputError(f"{path}: its mask would have the same name, {output.name}, as that of {owners[output]}")
        owners[output] = path
        scans.append(Scan(name, str(path), str(output), str(gt) if gt else None, own_adapter or adapter))
    return scans


# ---------------------------------------------------------------- on a worker
@lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int):
    from .model import load_model

    return load_model(path)


def _model(path: str | None):
    """The base model, loaded once per worker process and file version."""
    from .library import default_model_path

    file = Path(path) if path else default_model_path()
    if not file.is_file():
        raise InputError(f"{file}: no such model file")
    return _cached_model(str(file), file.stat().st_mtime_ns)


def check_standardize(standardize: str, adapter: str) -> None:
    """Refuse a standardisation choice that cannot run with ``adapter`` before any scan is read."""
    if standardize not in MODES:
        raise InputError(f"standardize must be one of {', '.join(MODES)}, not {standardize!r}")
    if standardize == "auto" and adapter == "auto":
        raise InputError(f"--standardize auto and --adapter {adapter}: standardise on or off with this adapter choice")
    if standardize != "off" and adapter == "adapt":
        raise InputError(
            f"--standardize {standardize} and --adapter adapt: adapting chooses the standardisation itself"
        )


def _segment(
    scan: Scan, model_path: str | None, device: str, adapters_dir: str, tta: int = 1, standardize: str = "off"
) -> tuple[object, object, str, bool]:
    """(volume, Segmentation, adapter label, standardised?) of one scan, by its adapter choice.

    ``tta`` mirror views per slice. With ``adapt`` the scan gets an adapter of
    adapt's default objective (an intensity map, kept by ``--standardize auto``'s
    rule on plain segmentations; "standardised?" says whether it maps the scan at
    all); with ``tta`` > 1 the kept model then segments once more with the mirror
    views. ``standardize`` as ``convlora segment --standardize`` (off with ``adapt``).
    """
    from .adapt import AdaptConfig, run_adaptation
    from .adapters import save_adapter
    from .choose import choose_adapter, iter_segment_checked
    from .inference import input_reference, run_to_end, segment
    from .library import library_files, resolve_adapter
    from .nifti import load_volume
    from .selection import iter_plain_and_standardized

    check_standardize(standardize, scan.adapter)
    volume = load_volume(scan.input)
    base = _model(model_path)
    on = standardize == "on"
    if scan.adapter == "adapt":  # the gate weighs the adapter against the source model as it is, as adapt does
        source = segment(base, volume, device=device)
        done = run_adaptation(base, volume, AdaptConfig(device=device), name=scan.name, source=source)
        if done.accepted and done.segmentation is not None:
            path = Path(adapters_dir) / f"{scan.name}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_adapter(done.adapter, path, overwrite=True)  # a rerun of a scan that died after this line
            result = done.segmentation if tta == 1 else segment(base, volume, done.adapter, device=device, tta=tta)
            return volume, result, str(path), done.adapter.metadata.get("input", "plain") != "plain"
        result = source if tta == 1 else segment(base, volume, device=device, tta=tta)
        return volume, result, "none (adaptation refused by the gate)", False
    if scan.adapter == "auto":
        choice = choose_adapter(base, volume, [path for _, _, path in library_files()], device=device)
        checked = run_to_end(iter_segment_checked(base, volume, choice, device=device, tta=tta, standardize=on))
        kept = choice.adapter if checked.label == choice.label else None
        standardized = input_reference(base, kept, on) is not None
        return volume, checked.segmentation, f"auto: {checked.label}", standardized
    adapter = resolve_adapter(scan.adapter)
    if standardize == "auto":
        choice = run_to_end(iter_plain_and_standardized(base, volume, adapter, device=device, tta=tta))
        return volume, choice.kept, scan.adapter, choice.is_standardized
    standardized = input_reference(base, adapter, on) is not None
    return volume, segment(base, volume, adapter, device=device, tta=tta, standardize=on), scan.adapter, standardized


def process_scan(
    scan: Scan,
    model_path: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    adapters_dir: str = "",
    tta: int = 1,
    standardize: str = "off",
) -> dict:
    """Segment one scan and write its mask (atomically); the results row. Never raises: errors become the row."""
    import torch

    from .metrics import evaluate
    from .nifti import load_mask, save_mask

    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    row: dict = {"input": scan.input, "output": scan.output, "gt": scan.gt or "", "worker": socket.gethostname()}
    row["worker"] = f"{row['worker']}:{os.getpid()}"
    try:
        volume, result, label, standardized = _segment(scan, model_path, device, adapters_dir, tta, standardize)
        save_mask(result.mask, volume, scan.output, overwrite=True)  # a task run again after a lost worker
        row.update(status="ok", error="", adapter=label, volume_ml=round(result.volume_ml, 3))
        row["standardized"] = standardized
        if scan.gt:
            gt = load_mask(scan.gt)
            if gt.data.shape != result.mask.shape:
                raise InputError(f"{scan.gt}: ground truth shape {gt.data.shape} differs from the scan's")
            figures = evaluate(result.mask, gt.data > 0, gt.spacing)
            row.update({k: round(float(figures[k]), 4) for k in ("dice", "surface_dice", "hd95_mm")})
    except InputError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken scan must not stop a cohort; its row says what happened
        row.update(status="error", error=f"{scan.input}: {type(exc).__name__}: {exc}".splitlines()[0])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


# ---------------------------------------------------------------- the client
class ResultsTable:
    """The results CSV in OUTDIR: rows appended (and flushed) as scans finish; what is done already."""

    def __init__(self, outdir: Path) -> None:
        self.path = outdir / RESULTS_CSV

    def done(self) -> set[str]:
        """Inputs with an ``ok`` row whose mask is still there: a rerun skips them."""
        if not self.path.is_file():
            return set()
        with self.path.open(newline="", encoding="utf-8") as handle:
            return {
                r["input"] for r in csv.DictReader(handle) if r.get("status") == "ok" and Path(r["output"]).is_file()
            }

    def todo(self, scans: list[Scan]) -> list[Scan]:
        """The scans a run still has to do: all but those :meth:`done`."""
        done = self.done()
        return [scan for scan in scans if scan.input not in done]

    def foreign_outputs(self, scans: list[Scan]) -> list[str]:
        """Masks already where ``scans`` would write theirs, in a folder no batch run wrote (no table): kept."""
        return [] if self.path.is_file() else [scan.output for scan in scans if Path(scan.output).exists()]

    def append(self, row: dict) -> None:
        """Append ``row`` under the table's own header (a table begun by an older version keeps its columns)."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        columns = list(COLUMNS) if new else self._header()
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in columns})
            handle.flush()
            os.fsync(handle.fileno())

    def _header(self) -> list[str]:
        with self.path.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), None) or list(COLUMNS)

    def latest_rows(self) -> list[dict]:
        """One row per input, its last attempt (a rerun appends; the table keeps every attempt)."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="", encoding="utf-8") as handle:
            rows = {r["input"]: r for r in csv.DictReader(handle)}
        return list(rows.values())

    def write_parquet(self) -> Path:
        """The latest row of every input as Parquet beside the CSV (typed columns), written atomically."""
        import pandas as pd

        from .files import atomic_write

        frame = pd.DataFrame(self.latest_rows(), columns=list(COLUMNS))
        for column in ("seconds", "volume_ml", "dice", "surface_dice", "hd95_mm"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        frame["standardized"] = frame["standardized"].map({"True": True, "False": False}).astype("boolean")
        path = self.path.with_name(RESULTS_PARQUET)
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False), overwrite=True)
        return path


def connect(scheduler: str, workers: int):
    """A dask.distributed Client: a local cluster of ``workers`` processes, or the scheduler at ``scheduler``.

    A local worker runs one scan at a time (one dask thread); the scan's torch
    threads (``--threads-per-worker``) are its parallelism. Two scans at once
    in one worker would only share those cores and double its memory.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("convlora batch needs dask.distributed: pip install 'napari-convlora[batch]'") from None
    if scheduler == "local":
        import dask

        # dask sets MALLOC_TRIM_THRESHOLD_=65536 for its workers; with it glibc maps and unmaps every large
        # array afresh, and a scan takes 16 s instead of 6 s (measured, colin27 on 2 cores): unset it
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster)
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"{scheduler}: cannot reach the dask scheduler ({exc})") from None


def run_batch(
    scans: list[Scan],
    outdir: Path,
    client,
    model_path: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    tta: int = 1,
    standardize: str = "off",
) -> Iterator[dict]:
    """Submit every scan not done yet; yield each row as it finishes (after appending it to the table)."""
    from distributed import as_completed

    table = ResultsTable(outdir)
    todo = table.todo(scans)
    adapters_dir = str(outdir / "adapters")
    futures = [
        client.submit(
            process_scan,
            scan,
            model_path,
            device,
            threads,
            adapters_dir,
            tta,
            standardize,
            key=f"convlora-{i}-{time.time_ns()}",
        )
        for i, scan in enumerate(todo)
    ]
    for future in as_completed(futures):
        try:
            row = future.result()
        except Exception as exc:  # noqa: BLE001 - the task itself never raises; this is dask giving up on it
            scan = todo[futures.index(future)]
            row = {**asdict(scan), "status": "error", "error": f"{scan.input}: dask: {type(exc).__name__}: {exc}"}
            row["gt"] = scan.gt or ""
        table.append(row)
        yield row
