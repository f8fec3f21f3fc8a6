"""A time budget for training alone: Lightning's ``Timer`` (``--trainer.max_time``) counts the
validation that runs inside ``fit`` as training time, so two runs of the same budget train for
different times when one of them samples images at every validation and the other does not."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn


class TrainingTimer(Timer):
    """Stops ``fit`` once ``duration`` (``DD:HH:MM:SS``) of training has passed, not counting the
    validations inside it (nor the sanity check before it). Its state, saved in every checkpoint,
    is the training time so far and, apart, the validation time, so that a resumed run continues
    the same budget. ``train.py fit --max_train_time`` adds it (instead of ``--trainer.max_time``).
    """

    def __init__(self, duration: str, verbose: bool = True) -> None:
        super().__init__(duration=duration, interval="step", verbose=verbose)
        self._validating_since: float | None = None
        self._validation_seconds = 0.0  # in this process
        self._validation_before = 0.0  # in earlier processes of the run (from the checkpoint)

    def _in_fit(self, trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and self._start_time[RunningStage.TRAINING] is not None
            and self._end_time[RunningStage.TRAINING] is None
        )

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if self._in_fit(trainer):
            self._validating_since = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._validating_since is not None:
            self._validation_seconds += time.monotonic() - self._validating_since
            self._validating_since = None

    def validation_seconds(self) -> float:
        """Validation inside ``fit`` so far, this process's and the earlier ones'."""
        running = time.monotonic() - self._validating_since if self._validating_since is not None else 0.0
        return self._validation_before + self._validation_seconds + running

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        elapsed = super().time_elapsed(stage)
        if RunningStage(stage) != RunningStage.TRAINING:
            return elapsed
        return elapsed - (self.validation_seconds() - self._validation_before)  # the offset is training alone

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "validation_seconds": self.validation_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._validation_before = float(state_dict.get("validation_seconds", 0.0))
