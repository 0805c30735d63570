"""Does `--adapter auto`'s ``stats`` criterion name the scanner on heads other than Colin27?

Usage:
    python scripts/probe_autopick_heads.py --heads heads colin27 pycortex_s1 ds000031 -o out/autopick_heads.json
    python scripts/probe_autopick_heads.py --reuse out/autopick_heads.json   # the tables again, nothing re-run

``scripts/bench_autopick.py`` measures the pick on Colin27 only, a template-like
head in MNI space much like the MNI152 head the built-in adapters were made
from. This probe puts each named head through the six T1 profiles (seeds 0 1 2),
takes the 10 slices adaptation would read, and for the source model and every
built-in adapter records, at each encoder BN, the KL pieces that
:func:`napari_convlora.choose.statistics_fit` sums (the mean term and the
variance term, averaged over channels, and the median over channels of their
sum). Offline it then picks with the criterion as shipped (both terms, mean
over channels and layers) and with variants of it (one term, the median over
channels, some layers only), fitted on the first head and read on the others:
the count of scans where the pick names the scan's profile (for ``ge-3t`` the
source model counts too), as ``bench_autopick.py`` counts it. No segmentation:
this is about naming the scanner, not what a pick costs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from napari_convlora.adapters import apply_adapter, load_adapter
from napari_convlora.geometry import plan, select_slices
from napari_convlora.library import ADAPTER_SUFFIX, BUILTIN_ADAPTERS, SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.nifti import load_volume
from napari_convlora.scanner_reference import with_encoder_bn_inputs
from napari_convlora.simulate import PROFILES, SOURCE_PROFILE, simulate

T1_PROFILES = [name for name, profile in PROFILES.items() if not profile.stress]
# "deepest level": the last 7 encoder BNs, down3's downsampling conv and its three residual blocks
LAYERS = {
    "all": slice(None),
    "first 1": slice(0, 1),
    "first 3": slice(0, 3),
    "last 2": slice(-2, None),
    "deepest level": slice(-7, None),
}


Reference = list[tuple[torch.Tensor, torch.Tensor]]  # per encoder BN: per-channel mean and variance


def feature_statistics(unet: torch.nn.Module, stacks: list[torch.Tensor]) -> Reference:
    """Per encoder BN: the per-channel mean and variance of its input over all pixels of all ``stacks``.

    Stacks of different heads differ in size, so each is run alone and the moments are pooled.
    """
    per_stack: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = []  # (pixels, sum, sum of squares) per BN

    def measure(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> None:
        per_stack[-1].append((x.numel() / x.shape[1], x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))))

    for stack in stacks:
        per_stack.append([])
        with_encoder_bn_inputs(unet, stack, measure)
    found: Reference = []
    for layer in zip(*per_stack, strict=True):
        count = sum(n for n, _, _ in layer)
        mean = sum(total for _, total, _ in layer) / count
        squares = sum(sq for _, _, sq in layer) / count
        found.append((mean, (squares - mean * mean) * count / (count - 1)))  # unbiased, as BN's running_var
    return found


def kl_pieces(
    unet: torch.nn.Module, images: torch.Tensor, reference: Reference | None = None
) -> list[dict[str, float]]:
    """Per encoder BN: channel means of the KL's mean and variance terms, and the channel median of their sum.

    Against the BN's stored statistics, or ``reference`` (one (mean, variance) per encoder BN).
    """
    layers: list[dict[str, float]] = []

    def measure(bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> None:
        m, v = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)) + bn.eps
        if reference is None:
            mu, var = bn.running_mean.double(), bn.running_var.double() + bn.eps
        else:
            mu, var = reference[len(layers)][0], reference[len(layers)][1] + bn.eps
        mean_term, var_term = 0.5 * (m - mu) ** 2 / var, 0.5 * (v / var - 1.0 - torch.log(v / var))
        layers.append(
            {
                "mean": float(mean_term.mean()),
                "var": float(var_term.mean()),
                "median": float((mean_term + var_term).median()),
            }
        )

    with_encoder_bn_inputs(unet, images, measure)
    return layers


def slices_of(heads: Path, name: str, profile: str, seed: int, scaling: str) -> torch.Tensor:
    """The 10 slices adaptation would read of head ``name`` through simulated ``profile``."""
    t1 = load_volume(heads / name / "t1.nii.gz")
    scan, _ = simulate(t1, load_volume(heads / name / "mask_consensus.nii.gz"), profile, seed=seed)
    geometry, scaled = plan(scan, scaling)
    stack = geometry.to_model(scaled)
    return torch.from_numpy(stack[select_slices(stack, 10)][:, None].copy())


def pooled_references(heads: Path, pool: list[str], unets: dict, scaling: str) -> dict[str, Reference]:
    """Each adapter's feature statistics over the ``pool`` heads through its own profile (seed 0), pooled."""
    references = {}
    for label, unet in unets.items():
        if label in PROFILES:  # the built-ins are named for their profile
            references[label] = feature_statistics(unet, [slices_of(heads, name, label, 0, scaling) for name in pool])
            print(f"pooled reference of {label} over {', '.join(pool)}", flush=True)
    return references


def collect(heads: Path, names: list[str], seeds: list[int], pool: list[str]) -> list[dict]:
    base = load_model(SOURCE_MODEL)
    unets = {"source": base.copy().unet}
    for path in sorted(Path(BUILTIN_ADAPTERS).glob(f"*{ADAPTER_SUFFIX}")):
        unets[path.name.removesuffix(ADAPTER_SUFFIX)] = apply_adapter(base, load_adapter(path))
    pooled = pooled_references(heads, pool, unets, base.intensity_scaling) if pool else {}
    rows = []
    for name in names:
        for seed in seeds:
            for profile in T1_PROFILES:
                start = time.perf_counter()
                images = slices_of(heads, name, profile, seed, base.intensity_scaling)
                pieces = {label: kl_pieces(unet, images) for label, unet in unets.items()}
                row = {"head": name, "seed": seed, "profile": profile, "candidates": pieces}
                if pooled:  # the source model keeps its own statistics: it learnt them from eight heads
                    row["pooled"] = {label: kl_pieces(unet, images, pooled.get(label)) for label, unet in unets.items()}
                rows.append(row)
                print(f"{name} seed {seed} {profile}: {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def divergence(layers: list[dict[str, float]], terms: str, layer_slice: slice) -> float:
    if terms == "median of both":
        values = [layer["median"] for layer in layers]
    else:
        values = [sum(layer[t] for t in ("mean", "var") if terms in ("both", t)) for layer in layers]
    return float(np.mean(values[layer_slice]))


def pick(row: dict, terms: str, layer_slice: slice, references: str = "candidates") -> str:
    """The candidate whose statistics fit best; ``references``: "candidates" (as shipped) or "pooled"."""
    scores = {label: divergence(layers, terms, layer_slice) for label, layers in row[references].items()}
    return min(scores, key=lambda label: (scores[label], label != "source"))  # ties to the source model


def is_right(profile: str, label: str) -> bool:
    return label == profile or (profile == SOURCE_PROFILE and label == "source")


def report(rows: list[dict]) -> None:
    names = list(dict.fromkeys(row["head"] for row in rows))
    kinds = ["candidates", "pooled"] if "pooled" in rows[0] else ["candidates"]
    for references in kinds:
        what = "the adapters' own statistics" if references == "candidates" else "statistics pooled over heads"
        print(f"\nright picks per head, {what} (fit on {names[0]}, read on the others); shipped: both, all")
        print("| terms | layers | " + " | ".join(names) + " |")
        print("|---|---" + "|---" * len(names) + "|")
        for terms in ("both", "mean", "var", "median of both"):
            for layers, layer_slice in LAYERS.items():
                counts = []
                for name in names:
                    mine = [row for row in rows if row["head"] == name]
                    right = sum(is_right(row["profile"], pick(row, terms, layer_slice, references)) for row in mine)
                    counts.append(f"{right}/{len(mine)}")
                print(f"| {terms} | {layers} | " + " | ".join(counts) + " |")
        for name in names:
            mine = [row for row in rows if row["head"] == name]
            picks = Counter((row["profile"], pick(row, "both", LAYERS["all"], references)) for row in mine)
            wrong = ", ".join(
                f"{profile} -> {label} x{n}"
                for (profile, label), n in sorted(picks.items())
                if not is_right(profile, label)
            )
            print(f"{name}, both terms, all layers, wrong picks: {wrong or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", metavar=("FOLDER", "HEAD"), help="the heads folder, then head names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--pool",
        nargs="+",
        default=[],
        metavar="HEAD",
        help="also score against each adapter's feature statistics over these heads through its profile (seed 0)",
    )
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--reuse", type=Path, help="a JSON this script wrote: print its tables, run nothing")
    args = parser.parse_args()
    if args.reuse:
        rows = json.loads(args.reuse.read_text())
    else:
        if not args.heads or len(args.heads) < 2 or not args.output:
            parser.error("--heads FOLDER HEAD [HEAD ...] and -o OUTPUT are needed unless --reuse is given")
        rows = collect(Path(args.heads[0]), args.heads[1:], args.seeds, args.pool)
        args.output.write_text(json.dumps(rows))
    report(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
