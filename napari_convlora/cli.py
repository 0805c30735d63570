"""The ``convlora`` command line: segment, adapt, evaluate.

Contract for scripts and pipelines: with ``--json`` each command prints exactly
one JSON object on stdout. Exit status 0 on success, 2 on bad input or usage
(one line ``error: ...`` on stderr, naming the file and the problem), 1 on an
unexpected internal error; ``batch`` also exits 2 when any scan failed (each
failure is a row of its results table, and the others ran). Outputs are
written to a temporary name and renamed, so a failure never leaves a partial
file behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become our one-line ``error:`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def _number(text: str, kind: type, low: float, high: float = math.inf, what: str = "") -> int | float:
    """Parse a number in [low, high) for argparse, with a message that names the rule."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not (low <= value < high) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, 1, what="a whole number of at least 1")


def _non_negative_int(text: str) -> int:
    return _number(text, int, 0, what="a whole number of at least 0")


def _positive_float(text: str) -> float:
    return _number(text, float, math.ulp(0.0), what="a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, what="a number of at least 0")


def _probability(text: str) -> float:
    return _number(text, float, 0.0, math.nextafter(1.0, 2.0), what="a number from 0 to 1")


def _seed(text: str) -> int:
    return _number(text, int, 0, 2**32, what="a whole number from 0 to 2**32 - 1")


def build_parser() -> argparse.ArgumentParser:
    from .adapt import SELECTIONS
    from .adapters import ADAPTER_KINDS
    from .device import DEVICE_CHOICES
    from .geometry import INTENSITY_SCALINGS
    from .inference import PRECISIONS, SMOOTH_MM, TTA_MIRRORS
    from .objectives import DEFAULT_OBJECTIVE, OBJECTIVES
    from .selection import DEFAULT_GATE, GATES
    from .standardize import MODES as STANDARDIZE_MODES

    parser = _Parser(prog="convlora", description="Skull stripping with per-scanner ConvLoRA adapters.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("segment", help="brain mask of a NIfTI volume")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="mask to write (.nii or .nii.gz)")
    p.add_argument("--adapter", default="none", help="none, auto (picked without labels), a library name, or a file")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument(
        "--no-cleanup", action="store_true", help="keep every component and hole (no opening, largest piece, filling)"
    )
    p.add_argument(
        "--single-pass",
        action="store_true",
        help="one pass over the whole head instead of a coarse pass that finds the brain, then a pass on it",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="what the network computes in; auto: bfloat16 on a CPU that has it natively (about 2x faster), "
        "else float32",
    )
    p.add_argument(
        "--tta",
        type=int,
        default=1,
        choices=list(TTA_MIRRORS),
        help="test-time augmentation: average each slice over 1 (off), 2 or 4 mirror images; "
        "more accurate boundaries, about that many times the network time (BENCHMARKS.md section 1)",
    )
    p.add_argument(
        "--smooth",
        type=_non_negative_float,
        default=SMOOTH_MM,
        metavar="MM",
        help=f"Gaussian sigma in mm on the probability before the threshold (default {SMOOTH_MM:g}; 0: off)",
    )
    p.add_argument(
        "--standardize", nargs="?", const="on", default="off", choices=STANDARDIZE_MODES, help=STANDARDIZE_HELP
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser(
        "adapt",
        help="make an adapter for a scanner from one of its scans, without labels",
        description="Make an adapter for the scanner of INPUT, without labels. By default (--objective intensity) "
        "the adapter is an intensity map: the scan as it is, standardised, or through a learnt curve, kept by the "
        "rule of `segment --standardize auto`; no weight is trained. The other objectives train ConvLoRA "
        "adapters on a handful of slices; --slices, --epochs, --lr, --rank, --kind, --experts, --no-adabn, "
        "--standardize, --selection and --gate are theirs.",
    )
    p.add_argument("input", type=Path)
    p.add_argument("--name", help="adapter name (default: the input file's name)")
    p.add_argument("--description", default="", help="free text stored in the adapter, e.g. scanner and protocol")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    p.add_argument("--slices", type=_positive_int, default=10)
    p.add_argument("--epochs", type=_positive_int, default=5)
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--rank", type=_positive_int, default=2)
    p.add_argument(
        "--kind",
        choices=ADAPTER_KINDS,
        default="convlora",
        help="convlora (default), or moe: Conv-LoRA with a mixture of scale experts (not mergeable, slower inference)",
    )
    p.add_argument("--experts", type=_positive_int, help="scale experts per layer, for --kind moe (default 8)")
    p.add_argument(
        "--no-adabn",
        action="store_true",
        help="keep the source model's batch-norm statistics (adapters alone; see BENCHMARKS.md for when it helps)",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="ConvLoRA objectives: adapt on slices standardised as `segment --standardize` does; the adapter then "
        "standardises every scan",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=DEFAULT_OBJECTIVE,
        help=f"label-free objective (default {DEFAULT_OBJECTIVE}: an intensity map, no weights trained; "
        "early-head: the paper's ConvLoRA + AdaBN; see BENCHMARKS.md section 2)",
    )
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="consistency",
        help="epoch kept: best perturbation consistency (default) or early-head agreement (the paper's)",
    )
    p.add_argument(
        "--gate",
        choices=list(GATES),
        default=DEFAULT_GATE,
        help="the do-no-harm gate's score: confidence of the whole-volume mask (default) or perturbation consistency",
    )
    p.add_argument(
        "--keep-rejected",
        action="store_true",
        help="write the adapter even when the do-no-harm gate rejects it (its metadata says accepted: false)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=2)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("-o", "--output", type=Path, help="adapter file to write (default: the library, under NAME)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name or path")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("demo", help="segment, adapt to a simulated scanner, segment again, on the bundled sample")
    p.add_argument("--out", type=Path, default=Path("convlora-demo"), help="folder for masks and the adapter")
    p.add_argument("--profile", help="simulated target scanner (default ge-1.5t; see: convlora profiles)")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier demo")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("simulate", help="apply a simulated scanner profile to a head (and its mask)")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="simulated volume to write (.nii or .nii.gz)")
    p.add_argument("--profile", required=True, help="profile name (see: convlora profiles)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--mask", type=Path, help="brain mask of INPUT, carried to the simulated grid")
    p.add_argument("--mask-output", type=Path, help="where to write the carried mask (needs --mask)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("profiles", help="list the simulated scanner profiles")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("train-source", help="train the source U-Net and early head on labelled heads")
    p.add_argument(
        "--head",
        nargs=2,
        action="append",
        type=Path,
        required=True,
        metavar=("T1", "MASK"),
        help="a labelled head (repeat for several)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--steps", type=_positive_int, default=1500, help="U-Net training steps")
    p.add_argument("--head-steps", type=_positive_int, default=300, help="early-head training steps (U-Net frozen)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--width", type=_positive_int, default=16, help="base width of the U-Net (16 in the paper)")
    p.add_argument(
        "--intensity-scaling",
        choices=list(INTENSITY_SCALINGS),
        default="tissue",
        help="how inputs are scaled, recorded in the weights file ('percentile': models made before 2026-11-24)",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--init", type=Path, help="start from these weights (same --width) instead of random ones")
    p.add_argument("--checkpoint", type=Path, help="resumable checkpoint (default: OUTPUT.checkpoint)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="processes that augment batches ahead (0: none; the batches are the same either way)",
    )
    p.add_argument(
        "--contrast-curves",
        type=_probability,
        default=0.0,
        metavar="P",
        help="share of crops given a random T1-like tissue-contrast curve (0: none, the shipped model's recipe)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("benchmark", help="every adaptation method on every simulated scanner, against the mask")
    p.add_argument("-o", "--output", type=Path, required=True, help="results to write (.json); resumes from it")
    p.add_argument("--markdown", type=Path, help="also write the summary table here (.md)")
    p.add_argument("--t1", type=Path, help="head to simulate (default: the bundled sample)")
    p.add_argument("--mask", type=Path, help="its brain mask (default: the bundled consensus mask)")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    p.add_argument("--profiles", nargs="+", help="profiles (default: all; the source profile is always added)")
    p.add_argument(
        "--methods",
        nargs="+",
        help="methods (default: all the model can run: curve and reference need a scanner reference; "
        "'source' is always added)",
    )
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
    p.add_argument("--slices", type=_positive_int, default=10)
    p.add_argument("--epochs", type=_positive_int, default=5)
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--tolerance", type=_positive_float, default=1.0, help="surface Dice tolerance in mm")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: seed 0, 2 profiles, 4 slices, 1 epoch, a 24 mm central slab"
    )
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("evaluate", help="Dice, surface Dice and HD95 of a mask against a ground truth")
    p.add_argument("prediction", type=Path)
    p.add_argument("ground_truth", type=Path)
    p.add_argument("--tolerance", type=_positive_float, default=1.0, help="surface Dice tolerance in mm")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("adapters", help="the adapter library: list, show, remove, rename, import, export")
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = actions.add_parser("list", help="built-in and user adapters, and whether each fits the base model")
    a.add_argument("--model", type=Path, help="base model to check against (default: the shipped source model)")
    a = actions.add_parser("show", help="everything an adapter file says about itself")
    a.add_argument("name")
    a.add_argument("--model", type=Path, help="base model to check against (default: the shipped source model)")
    a = actions.add_parser("remove", help="delete an adapter from the user library")
    a.add_argument("name")
    a = actions.add_parser("rename", help="give a user adapter another library name")
    a.add_argument("name")
    a.add_argument("new_name")
    a = actions.add_parser("import", help="check an adapter file and copy it into the user library")
    a.add_argument("file", type=Path)
    a.add_argument("--name", help="library name (default: the name in the file)")
    a = actions.add_parser("export", help="copy a library adapter out to a file, to share it")
    a.add_argument("name")
    a.add_argument("file", type=Path, help="adapter file to write (.safetensors)")
    a.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    for a in actions.choices.values():
        a.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = sub.add_parser("batch", help="a cohort: every scan of a folder, glob or CSV, on dask.distributed (resumable)")
    p.add_argument("inputs", nargs="?", help="a folder of NIfTI scans, a glob (quoted), or a CSV: input[,gt][,adapter]")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the masks and results.csv/.parquet")
    p.add_argument("--csv", type=Path, help="the scans as a CSV (columns input[,gt][,adapter]) instead of INPUTS")
    p.add_argument("--gt-dir", type=Path, help="ground truths: the file of the same name in this folder, if there")
    p.add_argument("--adapter", default="none", help="none, auto, a library name or file, or adapt (per scan, gated)")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    p.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    p.add_argument(
        "--tta", type=int, default=1, choices=list(TTA_MIRRORS), help="mirror views per slice, as for segment"
    )
    p.add_argument(
        "--standardize",
        nargs="?",
        const="on",
        default="off",
        choices=STANDARDIZE_MODES,
        help="as for segment (on with --adapter adapt: adapt on standardised slices; auto needs a fixed adapter)",
    )
    p.add_argument("--scheduler", default="local", help="local (a cluster of processes here) or tcp://HOST:PORT")
    p.add_argument("--workers", type=_positive_int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--threads-per-worker", type=_positive_int, default=2, help="torch threads for each scan (a worker runs one)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace masks already in OUTPUT that no run recorded")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("gui", help="open napari with the ConvLoRA Skull Strip widget docked (needs the [qt] extra)")
    p.add_argument("--sample", action="store_true", help="load the sample as a simulated Philips 3 T scan + its mask")
    p.add_argument("--model", type=Path, help="base model weights (default: the shipped source model)")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _load_base(model: Path | None):
    from .library import default_model_path
    from .model import load_model

    return load_model(model if model is not None else default_model_path())


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def cmd_segment(args: argparse.Namespace) -> dict:
    from .choose import choose_adapter, iter_segment_checked
    from .files import check_output_path
    from .inference import run_to_end, segment
    from .library import library_files, resolve_adapter
    from .nifti import NIFTI_SUFFIXES, load_volume, save_mask
    from .selection import iter_plain_and_standardized

    check_output_path(args.output, overwrite=args.overwrite, suffixes=NIFTI_SUFFIXES)
    if _same_file(args.output, args.input):
        raise InputError(f"{args.output}: the output would overwrite the input")
    volume = load_volume(args.input)
    base = _load_base(args.model)
    options = {
        "device": args.device,
        "cleanup": not args.no_cleanup,
        "two_pass": not args.single_pass,
        "precision": args.precision,
        "tta": args.tta,
        "smooth_mm": args.smooth,
    }
    if args.standardize == "auto" and args.adapter == "auto":
        raise InputError("--standardize auto and --adapter auto: choose the adapter, or standardise on or off")
    if args.standardize == "on":
        options["standardize"] = True
    auto = checked = standardized = None
    if args.adapter == "auto":
        auto = choose_adapter(base, volume, [path for _, _, path in library_files()], device=args.device)
    start = time.perf_counter()  # "seconds" is segmentation time (auto's check segmentation included)
    if auto is not None:
        checked = run_to_end(iter_segment_checked(base, volume, auto, **options))
        print(f"note: {checked.note}", file=sys.stderr)
        result = checked.segmentation
    elif args.standardize == "auto":
        choice = run_to_end(iter_plain_and_standardized(base, volume, resolve_adapter(args.adapter), **options))
        result, standardized = choice.kept, choice.note
        print(f"note: {standardized}", file=sys.stderr)
    else:
        result = segment(base, volume, resolve_adapter(args.adapter), **options)
    save_mask(result.mask, volume, args.output, overwrite=args.overwrite)
    out = {
        "input": str(args.input),
        "output": str(args.output),
        "adapter": result.adapter,
        "seconds": round(time.perf_counter() - start, 3),
        "volume_ml": round(result.volume_ml, 3),
    }
    if standardized is not None:
        out["standardize"] = standardized
    if auto is not None:
        out["auto"] = {"choice": auto.label, "criterion": auto.criterion, "scores": auto.scores}
        out["auto"]["skipped"] = auto.skipped
        out["auto"]["kept"] = checked.label
    return out


def cmd_batch(args: argparse.Namespace) -> dict:
    from .batch import RESULTS_CSV, ResultsTable, check_standardize, connect, plan_scans, run_batch

    if args.csv is not None and args.gt_dir is not None:
        raise InputError("--gt-dir and --csv: give ground truths in the CSV's gt column instead")
    if args.gt_dir is not None and not args.gt_dir.is_dir():
        raise InputError(f"{args.gt_dir}: no such folder (--gt-dir)")
    if args.model is not None and not args.model.is_file():
        raise InputError(f"{args.model}: no such model file")
    if args.output.exists() and not args.output.is_dir():
        raise InputError(f"{args.output}: is a file; give a folder for the masks")
    scans = plan_scans(args.inputs, args.output.resolve(), args.adapter, args.gt_dir, args.csv)
    for adapter in sorted({scan.adapter for scan in scans}):
        check_standardize(args.standardize, adapter)
    table = ResultsTable(args.output.resolve())
    taken = [] if args.overwrite else table.foreign_outputs(scans)
    if taken:
        raise InputError(f"{taken[0]}: already exists (and {len(taken) - 1} more); pass --overwrite to replace")
    args.output.mkdir(parents=True, exist_ok=True)
    todo = len(table.todo(scans))
    bar = None
    if sys.stderr.isatty() and todo:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc="scans", unit="scan", file=sys.stderr)
    start = time.perf_counter()
    client = connect(args.scheduler, args.workers) if todo else None
    rows = []
    try:
        if client is not None:
            model = str(args.model.resolve()) if args.model is not None else None
            rows_in = run_batch(
                scans,
                args.output.resolve(),
                client,
                model,
                args.device,
                args.threads_per_worker,
                args.tta,
                args.standardize,
            )
            for row in rows_in:
                rows.append(row)
                if row["status"] != "ok":
                    message = f"failed: {row['error']}"
                    print(message, file=sys.stderr) if bar is None else bar.write(message, file=sys.stderr)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster = client.cluster if args.scheduler == "local" else None
            client.close()
            if cluster is not None:
                cluster.close()
    seconds = time.perf_counter() - start
    parquet = table.write_parquet()
    failed = [row for row in rows if row["status"] != "ok"]
    return {
        "output": str(args.output),
        "results_csv": str(args.output / RESULTS_CSV),
        "results_parquet": str(parquet),
        "scans": len(scans),
        "skipped_done": len(scans) - todo,
        "ran": len(rows),
        "ok": len(rows) - len(failed),
        "failed": len(failed),
        "seconds": round(seconds, 2),
        "scans_per_minute": round(len(rows) / seconds * 60, 2) if rows and seconds > 0 else None,
        "exit_status": EXIT_INPUT if failed else EXIT_OK,
    }


def cmd_adapt(args: argparse.Namespace) -> dict:
    from .adapt import AdaptCancelled, AdaptConfig, AdaptDone, EpochReport, StepReport, adapt
    from .adapters import DEFAULT_EXPERTS, save_adapter
    from .files import check_output_path
    from .intensity_curve import CurveStep
    from .library import ADAPTER_SUFFIX, check_name, user_adapter_path
    from .nifti import load_volume, nifti_stem

    if args.experts is not None and args.kind != "moe":
        raise InputError("--experts applies to --kind moe only")
    name = check_name(args.name or nifti_stem(args.input))
    output = args.output or user_adapter_path(name, args.overwrite, "choose another --name or pass --overwrite")
    check_output_path(output, overwrite=args.overwrite, suffixes=(ADAPTER_SUFFIX,))
    config = AdaptConfig(
        slices=args.slices,
        epochs=args.epochs,
        lr=args.lr,
        rank=args.rank,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        kind=args.kind,
        experts=args.experts or DEFAULT_EXPERTS,
        adabn=not args.no_adabn,
        objective=args.objective,
        selection=args.selection,
        gate=args.gate,
        standardize=args.standardize,
    )
    config.check()
    volume = load_volume(args.input)
    base = _load_base(args.model)
    bar = _progress_bar()
    done = None
    try:
        for report in adapt(base, volume, config, name=name):
            if isinstance(report, StepReport) and bar is not None:
                bar.total = report.total_steps
                bar.set_postfix(epoch=f"{report.epoch}/{report.epochs}", loss=f"{report.loss:.4f}", refresh=False)
                bar.update(1)
            elif isinstance(report, CurveStep) and bar is not None:
                bar.total = report.steps
                bar.set_postfix(distance=f"{report.distance:.3f}", refresh=False)
                bar.update(1)
            elif isinstance(report, EpochReport) and bar is not None:
                bar.write(
                    f"epoch {report.epoch}/{report.epochs}: loss {report.loss:.4f}, "
                    f"consistency {report.score:.4f}, agreement {report.agreement:.4f}"
                )
            elif isinstance(report, (AdaptDone, AdaptCancelled)):
                done = report
    finally:
        if bar is not None:
            bar.close()
    assert isinstance(done, AdaptDone)
    done.adapter.metadata["description"] = args.description
    written = done.accepted or args.keep_rejected
    if written:
        save_adapter(done.adapter, output, overwrite=args.overwrite)
    if not done.accepted:
        print(
            f"adaptation did not help on this scan; keeping the source model ({done.gate_text}); "
            + (f"adapter written anyway to {output}" if written else "no adapter written (--keep-rejected writes it)"),
            file=sys.stderr,
        )
    return {
        "adapter": str(output) if written else None,
        "accepted": done.accepted,
        "gate": done.gate,
        "gate_score": round(done.gate_score, 5),
        "gate_source_score": round(done.gate_source_score, 5),
        "score": round(done.score, 5),
        "source_score": round(done.source_score, 5),
        "objective": args.objective,
        "name": name,
        "kind": done.adapter.metadata["kind"],
        "input": done.adapter.metadata.get("input"),  # objective intensity: the map kept (plain, head, brain, curve)
        "trainable_parameters": done.adapter.trainable_parameters,
        "seconds": round(done.seconds, 3),
        "best_epoch": done.best_epoch,
        "agreements": [round(a, 5) for a in done.agreements],
    }


def _progress_bar(desc: str = "adapting"):
    """A tqdm bar on stderr when it is a terminal; None otherwise (logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, desc=desc, unit="step", file=sys.stderr)


def cmd_train_source(args: argparse.Namespace) -> dict:
    import hashlib
    import shlex
    import subprocess

    import torch

    from .files import check_output_path
    from .model import load_model, save_model
    from .training import TrainConfig, TrainDone, TrainStep, load_heads, train_source

    check_output_path(args.output, overwrite=args.overwrite, suffixes=(".safetensors",))
    checkpoint = args.checkpoint or args.output.with_name(args.output.name + ".checkpoint")
    check_output_path(checkpoint, overwrite=True)
    inputs = [Path(p) for pair in args.head for p in pair]
    for path in (args.output, checkpoint):
        if any(_same_file(path, other) for other in inputs):
            raise InputError(f"{path}: would overwrite one of the --head inputs")
    if _same_file(args.output, checkpoint):
        raise InputError(f"{checkpoint}: the checkpoint cannot be the output file")
    config = TrainConfig(
        steps=args.steps,
        head_steps=args.head_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        seed=args.seed,
        device=args.device,
        intensity_scaling=args.intensity_scaling,
        workers=args.workers,
        contrast_curves=args.contrast_curves,
    )
    # The code that trains is the code checked out now, not whatever HEAD is when training ends. A copy of
    # the tree sent to a training machine (no .git, or a stale one) names its revision in CONVLORA_GIT_REVISION.
    try:
        revision = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except OSError:
        revision = None
    revision = os.environ.get("CONVLORA_GIT_REVISION") or revision
    heads = load_heads([(Path(t1), Path(mask)) for t1, mask in args.head], config.intensity_scaling)
    init = load_model(args.init) if args.init else None
    bar = _progress_bar("training")
    done = None
    for report in train_source(heads, config, checkpoint, init=init):
        if isinstance(report, TrainStep) and bar is not None:
            bar.total = report.total_steps
            bar.n = report.step
            bar.set_postfix(phase=report.phase, loss=f"{report.loss:.4f}")
        elif isinstance(report, TrainDone):
            done = report
    if bar is not None:
        bar.close()
    assert done is not None
    training = {
        "command": "convlora " + shlex.join(args.argv),
        "config": {k: v for k, v in config.__dict__.items()},
        "data": [
            {
                "t1": str(t1),
                "mask": str(mask),
                "t1_sha256": hashlib.sha256(Path(t1).read_bytes()).hexdigest(),
                "mask_sha256": hashlib.sha256(Path(mask).read_bytes()).hexdigest(),
            }
            for t1, mask in args.head
        ],
        "git_revision": revision,
        "init": None
        if init is None
        else {"model": str(args.init), "model_id": init.model_id, "training": init.metadata.get("training")},
        "torch": torch.__version__,
        "seconds": round(done.seconds, 1),
    }
    model_id = save_model(done.model, args.output, training=training, overwrite=args.overwrite)
    checkpoint.unlink(missing_ok=True)
    return {"model": str(args.output), "model_id": model_id, "seconds": round(done.seconds, 1)}


def cmd_demo(args: argparse.Namespace) -> dict:
    from .adapt import AdaptConfig, StepReport
    from .demo import DEMO_PROFILE, run_demo
    from .intensity_curve import CurveStep
    from .simulate import get_profile

    profile = args.profile or DEMO_PROFILE
    get_profile(profile)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"{args.out}: exists and is not a folder")
    try:
        args.out.mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"{args.out}: cannot create the folder ({exc.strerror or exc})") from None
    base = _load_base(args.model)
    bar = _progress_bar()

    def progress(report) -> None:
        if bar is not None and isinstance(report, (StepReport, CurveStep)):
            bar.total = report.total_steps if isinstance(report, StepReport) else report.steps
            bar.update(1)

    try:
        result = run_demo(
            base,
            args.out,
            profile,
            AdaptConfig(seed=args.seed, device=args.device),
            overwrite=args.overwrite,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    return {
        "profile": result.profile,
        "simulated": True,
        "results": result.rows,
        "adapt_seconds": round(result.adapt_seconds, 2),
        "files": [str(p) for p in result.files],
        "accepted": result.accepted,
        "gate": result.gate,
        "score": round(result.score, 5),
        "source_score": round(result.source_score, 5),
    }


def cmd_simulate(args: argparse.Namespace) -> dict:
    from .files import check_output_path
    from .nifti import NIFTI_SUFFIXES, load_mask, load_volume, save_volume
    from .simulate import get_profile, simulate

    get_profile(args.profile)
    if (args.mask is None) != (args.mask_output is None):
        raise InputError("--mask and --mask-output go together")
    outputs = [args.output] + ([args.mask_output] if args.mask_output is not None else [])
    for output in outputs:
        check_output_path(output, overwrite=args.overwrite, suffixes=NIFTI_SUFFIXES)
        if _same_file(output, args.input) or (args.mask is not None and _same_file(output, args.mask)):
            raise InputError(f"{output}: the output would overwrite an input")
    volume = load_volume(args.input)
    mask = load_mask(args.mask) if args.mask is not None else None
    simulated, simulated_mask = simulate(volume, mask, args.profile, seed=args.seed)
    save_volume(simulated, args.output, overwrite=args.overwrite)
    if simulated_mask is not None:
        save_volume(simulated_mask, args.mask_output, overwrite=args.overwrite)
    return {
        "input": str(args.input),
        "output": str(args.output),
        "mask_output": str(args.mask_output) if args.mask_output else None,
        "profile": args.profile,
        "seed": args.seed,
        "simulated": True,
    }


def cmd_profiles(args: argparse.Namespace) -> dict:
    from .simulate import PROFILES, SOURCE_PROFILE

    return {
        "source": SOURCE_PROFILE,
        "profiles": [{"name": p.name, "description": p.description} for p in PROFILES.values()],
    }


def cmd_benchmark(args: argparse.Namespace) -> dict:
    import platform
    from datetime import datetime, timezone

    from . import benchmark as bench
    from .adapt import AdaptConfig
    from .demo import SAMPLE_MASK, SAMPLE_T1
    from .files import atomic_write, check_output_path
    from .nifti import load_mask, load_volume
    from .simulate import SOURCE_PROFILE, get_profile

    if (args.t1 is None) != (args.mask is None):
        raise InputError("--t1 and --mask go together")
    check_output_path(args.output, overwrite=True, suffixes=(".json",))
    if args.markdown is not None:
        check_output_path(args.markdown, overwrite=True, suffixes=(".md",))
    profiles = args.profiles or bench.default_profiles()
    for name in profiles:
        get_profile(name)
    methods = bench.check_methods(args.methods or list(bench.METHODS))  # the default narrowed once the model is read
    seeds, slices, epochs = args.seeds, args.slices, args.epochs
    if args.quick:
        profiles = profiles if args.profiles else [SOURCE_PROFILE, "philips-3t"]
        seeds, slices, epochs = [seeds[0]], 4, 1
    profiles = list(dict.fromkeys([SOURCE_PROFILE, *profiles]))  # the in-domain reference is always measured
    methods = list(dict.fromkeys(["source", *methods]))
    settings = {
        "t1": str(args.t1 or "bundled sample"),
        "model": str(args.model or "shipped source model"),
        "slices": slices,
        "epochs": epochs,
        "lr": args.lr,
        "tolerance_mm": args.tolerance,
        "quick": args.quick,
    }
    done: list[bench.Cell] = []
    if args.output.exists():
        try:
            previous = json.loads(args.output.read_text())
            same = previous.get("settings") == settings
            done = bench.cells_from_json(previous["cells"]) if same else []
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            same = False
        if not same:
            raise InputError(
                f"{args.output}: exists and is not a benchmark run with these settings to resume; "
                "choose another --output or remove it"
            )
    volume = load_volume(args.t1 or SAMPLE_T1)
    mask = load_mask(args.mask or SAMPLE_MASK)
    if args.quick:
        volume, mask = bench.central_slab(volume, mask, 24.0)
    base = _load_base(args.model)
    if not args.methods:
        methods = ["source", *(m for m in bench.default_methods(base) if m != "source")]
    config = AdaptConfig(slices=slices, epochs=epochs, lr=args.lr, device=args.device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch device {args.device}"

    def write(cells: list) -> dict:
        result = {
            "command": "convlora " + " ".join(args.argv),
            "date": started,
            "machine": machine,
            "software_version": _version(),
            "base_model_id": base.model_id,
            "settings": settings,
            "profiles": profiles,
            "methods": {m: bench.METHODS[m] for m in methods},
            "seeds": seeds,
            "simulated": True,
            "cells": bench.cells_to_json(cells),
            "summary": bench.summarise(cells) if cells else None,
        }
        text = json.dumps(_json_safe(result), indent=1)
        atomic_write(args.output, lambda tmp: tmp.write_text(text), overwrite=True)
        return result

    cells = list(done)
    total = len(profiles) * len(seeds) * len(methods)
    for cell in bench.run_benchmark(base, volume, mask, profiles, seeds, methods, config, args.tolerance, done):
        cells.append(cell)
        write(cells)
        print(
            f"[{len(cells)}/{total}] {cell.profile} seed {cell.seed} {cell.method}: "
            f"surface Dice {cell.surface_dice:.4f} ({cell.adapt_seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    result = write(cells)
    table = bench.markdown(result["summary"])
    if args.markdown is not None:
        atomic_write(args.markdown, lambda tmp: tmp.write_text(table), overwrite=True)
    return {"output": str(args.output), "summary": result["summary"], "markdown": table}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    import numpy as np

    from .metrics import evaluate
    from .nifti import load_mask

    pred, gt = load_mask(args.prediction), load_mask(args.ground_truth)
    if pred.data.shape != gt.data.shape or not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise InputError(
            f"{args.ground_truth}: not on the same voxel grid as {args.prediction} "
            f"(shapes {gt.data.shape} vs {pred.data.shape}, or different affines); resample one onto the other first"
        )
    return evaluate(pred.data, gt.data, pred.spacing, args.tolerance)


def cmd_adapters(args: argparse.Namespace) -> dict:
    from . import library

    if args.action == "list":
        model_id = _load_base(args.model).model_id
        entries = [e.to_json() for e in library.list_adapters(model_id)]
        return {
            "action": "list",
            "model_id": model_id,
            "user_library": str(library.user_adapter_dir()),
            "adapters": entries,
        }
    if args.action == "show":
        return {"action": "show", **library.adapter_info(args.name, _load_base(args.model).model_id).to_json()}
    if args.action == "remove":
        return {"action": "remove", "name": args.name, "path": str(library.remove_adapter(args.name))}
    if args.action == "rename":
        path = library.rename_adapter(args.name, args.new_name)
        return {"action": "rename", "name": args.name, "new_name": args.new_name, "path": str(path)}
    if args.action == "import":
        return {"action": "import", "file": str(args.file), **library.import_adapter(args.file, args.name).to_json()}
    path = library.export_adapter(args.name, args.file, overwrite=args.overwrite)
    return {"action": "export", "name": args.name, "path": str(path)}


def _print_adapters(result: dict) -> None:
    action = result["action"]
    if action == "list":
        print(f"{'name':24s} {'source':7s} {'kind':8s} {'base model':12s} {'fits':4s} {'size':>8s}  description")
        for e in result["adapters"]:
            if e["error"]:
                print(f"{e['name']:24s} {e['source']:7s} unusable: {e['error']}")
                continue
            fits = "yes" if e["fits"] else "no"
            text = e["description"] or e["domain"]
            print(
                f"{e['name']:24s} {e['source']:7s} {e['kind']:8s} {e['base_model_id'][:12]:12s} {fits:4s} "
                f"{e['size_bytes'] / 1024:6.0f} kB  {text}"
            )
        print(f"({len(result['adapters'])} adapters; user library {result['user_library']})")
    elif action == "show":
        rows = [(k, v) for k, v in result.items() if k not in ("action", "metadata", "error")]
        rows += [(f"metadata.{k}", v) for k, v in result["metadata"].items()]
        for key, value in rows:
            print(f"{key:25s} {value}")
    elif action == "import":
        print(f"{result['file']}: imported as {result['name']!r} ({result['path']})")
    elif action == "remove":
        print(f"{result['name']}: removed {result['path']}")
    elif action == "rename":
        print(f"{result['name']}: renamed to {result['new_name']!r} ({result['path']})")
    else:
        print(f"{result['name']}: exported to {result['path']}")


def cmd_gui(args: argparse.Namespace) -> dict:
    """Open napari with the widget; exits with napari's event loop (napari and Qt are imported only here)."""
    try:
        from ._napari.launch import launch
    except ImportError as exc:
        raise InputError(f'the GUI needs napari and Qt: pip install -e ".[qt]" ({exc})') from None
    launch(sample=args.sample, model=args.model)
    raise SystemExit(EXIT_OK)


STANDARDIZE_HELP = (
    "map the scan's intensity histogram (nine percentiles of the head) onto the model's training heads' before "
    "the network reads it: no training, helps on scanners with another contrast (BENCHMARKS.md section 2); "
    "auto: segment as it is, standardised, and standardised on the brain too (its 10th and 90th percentiles, "
    "under the standardised mask), and, if the model carries a scanner reference and no adapter is used, through "
    "an intensity curve learnt on 10 slices towards the training heads' encoder features (about a minute on a "
    "CPU); keep the curve's mask if it is no less confident than the plain one and the brain-standardised input "
    "is no farther from the training heads' features than the scan's; else the brain-standardised mask "
    "if its input's encoder features are the "
    "nearest to the training heads' and nearer than the scan's by 0.4 (the model's scanner reference), its mask no "
    "less confident than the plain one (without a reference or with an adapter: if its confidence beats both "
    "others' by 0.003, as before); else the head-standardised one if the confidence gate lets it, else the plain "
    "one. `convlora adapt` (by default) keeps the same choice as an intensity adapter for the scanner's other "
    "scans; an intensity adapter maps the scan its own way whatever this says"
)
COMMANDS = {
    "segment": cmd_segment,
    "adapt": cmd_adapt,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "profiles": cmd_profiles,
    "train-source": cmd_train_source,
    "benchmark": cmd_benchmark,
    "adapters": cmd_adapters,
    "gui": cmd_gui,
    "batch": cmd_batch,
}


def _json_safe(value):
    """NaN and Inf are not JSON: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _print_human(command: str, result: dict) -> None:
    if command == "evaluate":
        print(
            f"Dice {result['dice']:.4f}  surface Dice @ {result['tolerance_mm']:g} mm {result['surface_dice']:.4f}  "
            f"HD95 {result['hd95_mm']:.2f} mm  volume {result['volume_ml_pred']:.1f} ml "
            f"(ground truth {result['volume_ml_gt']:.1f} ml)"
        )
    elif command == "demo":
        print(f"Sample head under the simulated scanner profile {result['profile']!r}, against its reference mask:")
        print(f"{'':14s} {'Dice':>7s} {'surface Dice':>13s} {'HD95 mm':>8s} {'volume ml':>10s}")
        for row, m in result["results"].items():
            print(
                f"{row:14s} {m['dice']:7.4f} {m['surface_dice']:13.4f} {m['hd95_mm']:8.2f} {m['volume_ml_pred']:10.1f}"
            )
        print(
            f"adaptation: {result['adapt_seconds']:.1f} s on 10 unlabeled slices; "
            f"files in {Path(result['files'][0]).parent}"
        )
        verdict = "accepts the adapter" if result["accepted"] else "would keep the source model"
        print(
            f"do-no-harm gate (no labels): {result['gate']} {result['score']:.4f} against the source model's "
            f"{result['source_score']:.4f}: it {verdict}"
        )
    elif command == "profiles":
        for profile in result["profiles"]:
            print(f"{profile['name']:13s} {profile['description']}")
    elif command == "simulate":
        print(f"{result['output']}: {result['profile']} (simulated), seed {result['seed']}")
    elif command == "benchmark":
        print(result["markdown"], end="")
        print(f"(surface Dice, mean ± sd over seeds, simulated scanners; all figures in {result['output']})")
    elif command == "train-source":
        print(f"{result['model']}: model {result['model_id'][:12]}, {result['seconds']:.0f} s")
    elif command == "adapters":
        _print_adapters(result)
    elif command == "batch":
        print(
            f"{result['ok']} of {result['ran']} scans segmented into {result['output']} "
            f"({result['skipped_done']} done before, skipped; {result['failed']} failed) in {result['seconds']:.0f} s; "
            f"results in {result['results_csv']}"
        )
    elif command == "segment":
        print(
            f"{result['output']}: brain {result['volume_ml']:.1f} ml, adapter {result['adapter']}, "
            f"{result['seconds']:.1f} s"
        )
    elif result["adapter"] is None:
        print(
            f"no adapter written: the source model scores as well ({result['gate']} "
            f"{result['gate_score']:.4f} against {result['gate_source_score']:.4f})"
        )
    else:
        print(
            f"{result['adapter']}: {result['kind']} adapter {result['name']!r}, "
            f"{result['trainable_parameters']} trainable parameters, "
            f"best epoch {result['best_epoch']}, {result['seconds']:.1f} s"
        )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_BYTES = 1 << 30  # arrays under 1 GiB come from the reused heap; up to 1 GiB freed is kept


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # recorded in what train-source writes
        result = COMMANDS[args.command](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CONVLORA_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set CONVLORA_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        print(json.dumps(_json_safe(result)))
    else:
        _print_human(args.command, result)
    return int(result.get("exit_status", EXIT_OK))


def keep_freed_memory() -> None:
    """Let glibc keep the memory this process frees, for its next arrays, instead of handing it back to the OS.

    A segmentation makes and drops many arrays of tens of MB. By default glibc
    maps each anew and unmaps it on free, so every one costs page faults
    again: on the development VM touching 50 MB of fresh memory took 248 ms,
    the same memory reused 6 ms. ``convlora segment`` on ds000031, five runs
    each, interleaved: median 5.54 s with this, 6.20 s without, peak memory
    the same (BENCHMARKS.md section 4). Only for the command line's
    short-lived process: the widget's worker process lives on and would keep
    its peak. Does nothing where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass


def run() -> int:
    """The ``convlora`` console command: :func:`main` in a process that keeps and reuses its freed memory.

    ``segment`` then ends the process at once (:func:`exit_now`).
    """
    keep_freed_memory()
    code = main()
    if sys.argv[1:2] == ["segment"]:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process without the interpreter's teardown.

    Tearing down an interpreter that imported torch took about 0.2 s (and
    more on a busy machine): ``convlora segment`` of ds000031, whole processes
    interleaved with the version before, medians 3.39 → 3.29 s over 7 runs and
    4.35 → 3.93 s over 10 (BENCHMARKS.md section 4, item 9); a pipeline pays
    it once per scan. Only after ``segment``: by then the
    mask is written (renamed into place) and the command holds nothing that
    needs closing; ``batch``'s dask cluster and the training commands' files are
    left to the normal exit.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach the reader
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run())
