"""Callbacks shared by every method: sample grids, reconstruction grids, held-out scores, prediction files, data health,
progress and run summaries, stopping without loss, CPU threads, W&B."""

from .compile import CompileNetworks
from .data_health import SkippedSamplesLogger
from .prediction_writer import PromptImageWriter
from .progress import ProgressLog, RunSummary
from .reconstructions import ReconstructionGrid
from .sample_grid import SampleGrid
from .shapes_score import ShapesScore
from .stopping import SaveLastCheckpoint, ValidateAtEnd
from .threads import ThreadBudget
from .timer import TrainingTimer
from .wandb_logger import AutoOfflineWandbLogger

SaveOnInterrupt = SaveLastCheckpoint  # its former name: the config.yaml of earlier runs still loads

__all__ = [
    "AutoOfflineWandbLogger",
    "CompileNetworks",
    "ProgressLog",
    "PromptImageWriter",
    "ReconstructionGrid",
    "RunSummary",
    "SampleGrid",
    "SaveLastCheckpoint",
    "SaveOnInterrupt",
    "ShapesScore",
    "SkippedSamplesLogger",
    "ThreadBudget",
    "TrainingTimer",
    "ValidateAtEnd",
]
