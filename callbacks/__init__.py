"""Callbacks shared by every method: sample grids, prediction files, data health, W&B."""

from .data_health import SkippedSamplesLogger
from .prediction_writer import PromptImageWriter
from .sample_grid import SampleGrid
from .shapes_score import ShapesScore
from .wandb_logger import AutoOfflineWandbLogger

__all__ = ["AutoOfflineWandbLogger", "PromptImageWriter", "SampleGrid", "ShapesScore", "SkippedSamplesLogger"]
