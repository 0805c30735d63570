"""The napari layer of napari-convlora: reader, writer, sample data and the widget.

Everything here is thin: files and models are handled by the headless core
(``napari_convlora.nifti``, ``inference``, ``adapt``...), which never imports
napari or Qt. These modules turn core objects into layers and back, and run the
core's generators in napari thread workers.
"""
