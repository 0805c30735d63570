"""``convlora gui``: napari with the ConvLoRA Skull Strip widget docked, optionally with the sample loaded."""

from __future__ import annotations

from pathlib import Path

import napari

from .widget import ConvLoRAWidget

SAMPLE_KEY = "colin27-t1-philips-3t"  # the simulated-scanner twin and its reference mask (napari.yaml)


def open_viewer(
    sample: bool = False, model: Path | None = None, show: bool = True
) -> tuple[napari.Viewer, ConvLoRAWidget]:
    """A viewer with the widget docked on the right; with ``sample``, the simulated-scanner sample and its mask."""
    viewer = napari.Viewer(title="napari-convlora", show=show)
    if sample:
        viewer.open_sample("napari-convlora", SAMPLE_KEY)
    widget = ConvLoRAWidget(viewer, model_path=model)
    viewer.window.add_dock_widget(widget, name="ConvLoRA Skull Strip", area="right")
    return viewer, widget


def launch(sample: bool = False, model: Path | None = None) -> None:
    """Open the viewer and run the Qt event loop until it is closed."""
    open_viewer(sample=sample, model=model)
    napari.run()
