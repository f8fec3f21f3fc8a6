"""Text-image data: the shared shard datamodule, the shapes dataset and its scorer, converters.

The datamodules load on first use, so that ``datamodules.shapes`` (the renderer and its scorer,
used by ``evaluation``) imports no Lightning.
"""

from importlib import import_module

_LAZY = {"ShapesDataModule": ".shapes_datamodule", "TextImageDataModule": ".text_image",
         "OpenMojiDataModule": ".openmoji_datamodule"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
