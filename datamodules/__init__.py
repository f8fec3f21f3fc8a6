"""Text-image data: the shared shard datamodule, the shapes dataset and its scorer, converters."""

from .shapes_datamodule import ShapesDataModule
from .text_image import TextImageDataModule

__all__ = ["ShapesDataModule", "TextImageDataModule"]
