"""Add the size prior and the intensity landmarks to a model trained before ``train-source`` wrote them.

Usage: python scripts/add_shape_prior.py MODEL --heads heads -o OUT [--overwrite]

The size prior (napari_convlora.shape_prior) is learnt from the very masks the
model was trained on, the intensity landmarks (napari_convlora.standardize) from
the same heads' T1 volumes: the heads its
metadata lists (``training.data``), found by name under ``--heads`` (the folder
``scripts/prepare_heads.py`` writes), each checked against the SHA-256 the
metadata recorded (the file's bytes, or its decompressed bytes where the
training read a decompressed copy) before it is used. The weights are written unchanged, so the
model id stays the same (checked). Prints the model id, the prior and the landmarks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

from napari_convlora.errors import InputError
from napari_convlora.model import load_model, save_model
from napari_convlora.shape_prior import METADATA_KEY, learn_shape_prior
from napari_convlora.standardize import METADATA_KEY as LANDMARKS_KEY
from napari_convlora.standardize import learn_reference
from napari_convlora.training import load_heads


def sha256(path: Path, decompress: bool = False) -> str:
    digest = hashlib.sha256()
    opener = gzip.open if decompress and path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_pairs(metadata: dict, heads: Path) -> list[tuple[Path, Path]]:
    """(T1, mask) under ``heads`` for every head the model's metadata lists, hashes checked."""
    data = metadata.get("training", {}).get("data")
    if not data:
        raise InputError("the model's metadata lists no training data (training.data)")
    pairs = []
    for entry in data:
        name = Path(entry["t1"]).parent.name
        t1, mask = heads / name / "t1.nii.gz", heads / name / "mask_consensus.nii.gz"
        for path, recorded in ((t1, entry["t1_sha256"]), (mask, entry["mask_sha256"])):
            if not path.exists():
                raise InputError(f"{path}: no such file (the model was trained on head {name!r})")
            if sha256(path) != recorded and sha256(path, decompress=True) != recorded:
                raise InputError(f"{path}: not the file the model was trained on (SHA-256 differs)")
        pairs.append((t1, mask))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--heads", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        model = load_model(args.model)
        before = model.model_id
        pairs = training_pairs(model.metadata, args.heads)
        heads = load_heads(pairs, model.intensity_scaling)
        prior = learn_shape_prior([head.masks for head in heads])
        model.metadata[METADATA_KEY] = prior.as_metadata()
        model.metadata[LANDMARKS_KEY] = learn_reference(
            [head.landmarks for head in heads], [head.brain_landmarks for head in heads]
        ).as_metadata()
        after = save_model(model, args.output, overwrite=args.overwrite)
    except (InputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if after != before:
        print(f"error: the model id changed ({before} -> {after})", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "model": str(args.output),
                "model_id": after,
                "heads": [str(t1.parent.name) for t1, _ in pairs],
                METADATA_KEY: prior.as_metadata(),
                LANDMARKS_KEY: model.metadata[LANDMARKS_KEY],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
