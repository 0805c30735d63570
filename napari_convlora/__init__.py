"""Brain MRI skull stripping with a frozen 2D U-Net and small per-scanner ConvLoRA adapters.

The core (everything outside ``_widget``/``_napari`` modules) never imports Qt or napari.
"""

__version__ = "0.1.0"
