"""How a run ends: scored and saved at its last step, and, when stopped by Ctrl-C or SIGTERM,
at a step boundary with a checkpoint, so that nothing is lost. Every ``fit`` ends with a
resumable ``last.ckpt``, whatever ended it and whatever the validation settings."""

from __future__ import annotations

import os
import signal
import threading

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint_io import remove_partial_writes


def last_checkpoint_path(trainer) -> str:
    """Where ``--ckpt_path last`` looks: ``last.ckpt`` beside the run's ModelCheckpoint files."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


def saved_at_step(trainer, path: str) -> bool:
    """Whether a ModelCheckpoint of ``trainer`` wrote ``path`` at the current step. Decided from
    the callbacks' state, which every rank shares, never from the file system (a rank that cannot
    see rank zero's file would otherwise save alone and wait for the others forever)."""
    return any(
        isinstance(c, ModelCheckpoint)
        and c._last_global_step_saved == trainer.global_step
        and os.path.abspath(getattr(c, "_last_checkpoint_saved", "") or "") == os.path.abspath(path)
        for c in trainer.checkpoint_callbacks
    )


def _writes_last(callback, path: str) -> bool:
    """Whether ``callback`` (a ModelCheckpoint) keeps its latest state in ``path``: ``save_last``,
    or no monitor with ``filename: last``."""
    if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
        return False
    same = os.path.abspath(os.path.join(callback.dirpath, "last" + callback.FILE_EXTENSION)) == os.path.abspath(path)
    return same and (bool(callback.save_last) or (callback.monitor is None and callback.filename == "last"))


def stopping_after_this_epoch(trainer) -> bool:
    """Whether training ends when the current epoch loop ends (a stop request, ``max_time``,
    ``max_steps``, ``max_epochs``)."""
    if trainer.should_stop or (trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step):
        return True
    return trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1


class SaveLastCheckpoint(Callback):
    """Every ``fit`` ends with a resumable ``last.ckpt``, from which ``fit --ckpt_path last``
    continues at the same step: at its normal end (``max_steps``, ``max_time``, ``max_epochs``,
    early stopping) when no ModelCheckpoint wrote it at the final step (with validation off,
    none does), and on Ctrl-C (SIGINT) or SIGTERM, after the current step.
    ``train.py`` adds one to every ``fit`` whose config lists none.

    The first Ctrl-C asks for a stop: the step in progress finishes, the checkpoint is written,
    and ``fit`` ends as it does at ``max_steps`` (the run summary still prints). A second Ctrl-C
    quits at once. SIGTERM (``kill``, a scheduler's time limit) is turned by Lightning into an
    exception at the next step boundary; the checkpoint is written before the process exits.
    Under DDP the ranks agree on the step to stop at.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous_handler = None
        self._saved_step: int | None = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = "Ctrl-C"
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits at once)",
            flush=True,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested, self._saved_step = None, None
        if trainer.is_global_zero:  # what writers killed mid-write left (a checkpoint's size each)
            for folder in {os.path.dirname(last_checkpoint_path(trainer)), trainer.default_root_dir}:
                for path in remove_partial_writes(folder):
                    rank_zero_info(f"removed {path}, a checkpoint write that was interrupted")
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.requested = self.requested or "Ctrl-C on another rank"
            self.save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised between steps: the state is whole
            self.requested = "SIGTERM"
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The end of training is saved here, where Lightning's ModelCheckpoint saves too: the loop
        state then says "in this epoch", so a resume continues the epoch (at ``on_train_end`` the
        epoch is already counted as complete, and a resume would start the next one early)."""
        if stopping_after_this_epoch(trainer):
            self.save_at_end(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_at_end(trainer)  # whatever ended training without an epoch end

    def save_at_end(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        if not saved_at_step(trainer, last_checkpoint_path(trainer)):
            self.save(trainer, announce=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def save(self, trainer, announce: bool = True) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part; rank zero writes
        self._saved_step = trainer.global_step
        for callback in trainer.checkpoint_callbacks:  # the ModelCheckpoints that keep the same file:
            if _writes_last(callback, path):  # saved, so they neither write it again nor a last-v1.ckpt
                callback._last_checkpoint_saved = callback.last_model_path = path
                if callback.monitor is None and not callback.save_last:
                    callback._last_global_step_saved = trainer.global_step
        if announce:
            rank_zero_info(
                f"{self.requested}: saved {path} at step {trainer.global_step}; continue with "
                f"`python train.py fit ... --run_name {os.path.basename(trainer.default_root_dir)} --ckpt_path last`"
            )


class ValidateAtEnd(Callback):
    """Run a last validation (held-out score, sample grid, checkpoints) at the step where training
    stops at ``max_steps``, so the end of a run is scored and saved, not the validation before it.

    Lightning validates when ``trainer.should_stop`` is set during a step, which is how
    ``max_time`` and a stop request already end; ``max_steps`` ends the loop without it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
