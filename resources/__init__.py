"""Files shipped with napari-convlora (sample volume, and later the source model and built-in adapters).

Packaged as ``napari_convlora.resources`` so that code finds them the same way
from a checkout, an editable install and a wheel.
"""
