"""What a user sees: a head opened in napari through the plugin's reader, segmented, the mask over it.

Usage (napari with Qt installed; a screen or Xvfb):
    xvfb-run -a -s "-screen 0 1400x1000x24" python scripts/screenshot_head.py HEAD.nii.gz -o shot.png
                                                  [--gt MASK.nii.gz] [--axis 0]

Opens napari, reads HEAD with the plugin's reader (scale = voxel sizes), runs
``convlora segment``'s pipeline on it (shipped model, CPU), adds the mask as a
Labels layer (and the reference mask's outline, if given), shows the slice
through the mask's centre along ``--axis`` of the file, and saves a screenshot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import napari
import numpy as np
from scipy import ndimage

from napari_convlora._napari.reader import napari_get_reader
from napari_convlora.inference import segment
from napari_convlora.library import SOURCE_MODEL
from napari_convlora.model import load_model
from napari_convlora.nifti import load_mask, load_volume


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--gt", type=Path)
    parser.add_argument("--axis", type=int, default=0)
    args = parser.parse_args()
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in napari_get_reader(str(args.head))(str(args.head)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    volume = load_volume(args.head)
    result = segment(load_model(SOURCE_MODEL), volume, device="cpu")
    scale = tuple(float(s) for s in volume.spacing)
    viewer.add_labels(result.mask, name="brain (convlora)", scale=scale, opacity=0.45)
    if args.gt is not None:
        gt = load_mask(args.gt).data > 0
        viewer.add_labels(
            (gt & ~ndimage.binary_erosion(gt)).astype(np.uint8) * 2, name="reference outline", scale=scale
        )
    centre = ndimage.center_of_mass(result.mask)
    viewer.dims.set_point(args.axis, float(centre[args.axis]) * scale[args.axis])
    viewer.dims.order = (args.axis, *[a for a in range(3) if a != args.axis])
    viewer.reset_view()
    viewer.screenshot(str(args.output), canvas_only=True)
    viewer.close()
    print(f"{args.output}: {result.volume_ml:.0f} ml brain, {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
