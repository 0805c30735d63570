"""Sample data (File > Open Sample): the bundled head, its simulated-scanner twin, the consensus mask.

The twin is the bundled head as the *simulated* Philips 3 T profile would store
it (contrast, bias field, noise, 0.9 mm voxels, PIL orientation), with the
reference mask carried onto its grid. If the repository ships both files
(``colin27_t1_philips-3t.nii.gz`` and ``colin27_mask_consensus_philips-3t.nii.gz``)
they are used; otherwise the pair is made on the fly by the core's
:func:`~napari_convlora.simulate.simulate` with seed 0 (deterministic, a few
seconds, once per session). Image and mask always come from the same source,
so they are always on the same grid.
"""

from __future__ import annotations

from functools import lru_cache

from ..library import RESOURCES
from ..nifti import Volume, load_mask, load_volume
from ..simulate import simulate
from .layers import layer_data

SAMPLE_DIR = RESOURCES / "sample"
SAMPLE_T1 = SAMPLE_DIR / "colin27_t1.nii.gz"
SAMPLE_MASK = SAMPLE_DIR / "colin27_mask_consensus.nii.gz"
TWIN_PROFILE = "philips-3t"
TWIN_SEED = 0


def sample_head() -> list[tuple]:
    """The Colin27 T1 head shipped with the package (1 mm, RAS)."""
    return [layer_data(load_volume(SAMPLE_T1), name="colin27_t1")]


def sample_mask() -> list[tuple]:
    """The consensus brain mask of the Colin27 head (majority vote of three skull strippers)."""
    return [layer_data(load_mask(SAMPLE_MASK), name="colin27_mask_consensus", labels=True)]


@lru_cache(maxsize=1)
def twin(profile: str = TWIN_PROFILE) -> tuple[Volume, Volume]:
    """The simulated-scanner twin and its reference mask: shipped files if both exist, else simulated."""
    image_file = SAMPLE_DIR / f"colin27_t1_{profile}.nii.gz"
    mask_file = SAMPLE_DIR / f"colin27_mask_consensus_{profile}.nii.gz"
    if image_file.is_file() and mask_file.is_file():
        return load_volume(image_file), load_mask(mask_file)
    scan, mask = simulate(load_volume(SAMPLE_T1), load_mask(SAMPLE_MASK), profile, seed=TWIN_SEED)
    return scan, mask


def sample_twin() -> list[tuple]:
    """The bundled head as a simulated Philips 3 T scanner would store it, with its reference mask."""
    scan, mask = twin()
    return [
        layer_data(scan, name=f"colin27_t1_{TWIN_PROFILE}", labels=False),
        layer_data(mask, name=f"colin27_mask_{TWIN_PROFILE}", labels=True),
    ]
