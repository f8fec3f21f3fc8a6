"""Grids of images logged from rank zero during training: captioned samples for fixed prompts
(``SampleGrid``); the schedule and the writing are shared with other grids (``PeriodicGrid``)."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from lightning_modules.sharding import is_sharded

from .images import captioned_grid


class PeriodicGrid(Callback):
    """Every ``every_n_steps`` training steps (0: never) and at the end of every validation, make
    an image with :meth:`make_grid` (in eval mode, from rank zero), write it to
    ``<run dir>/samples/<prefix><step>.png`` and log it to W&B under ``key``."""

    prefix, key = "step_", "samples"

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps
        self._last_step, self._last_interval = -1, 0

    def make_grid(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Image.Image, str] | None:
        """The image and its W&B caption, or None when there is nothing to show."""
        raise NotImplementedError

    def log_grid(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        # sharded weights (FullyShardedStrategy): every forward gathers them from every rank, so
        # every rank samples the grid and rank 0 keeps it
        together = is_sharded(pl_module)
        if (not trainer.is_global_zero and not together) or trainer.global_step == self._last_step:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            made = self.make_grid(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        if made is None or not trainer.is_global_zero:
            self._last_step = trainer.global_step
            return None
        self._last_step = trainer.global_step
        grid, caption = made
        out_dir = os.path.join(trainer.default_root_dir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{self.prefix}{trainer.global_step:07d}.png")
        grid.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=[grid], caption=[caption], step=trainer.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # interval crossings, not exact multiples: a GAN advances global_step by 2 or more per batch
        if self.every_n_steps and trainer.global_step // self.every_n_steps > self._last_interval:
            self._last_interval = trainer.global_step // self.every_n_steps
            self.log_grid(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.log_grid(trainer, pl_module)


class SampleGrid(PeriodicGrid):
    """Every ``every_n_steps`` training steps and at the end of validation, generate images
    for ``prompts`` with a fixed seed, write ``<run dir>/samples/step_<n>.png`` and log the
    grid to W&B under ``samples`` with the prompts as captions.

    Args:
        prompts: the fixed prompts (one image each).
        every_n_steps: step interval (0 disables step-based logging).
        seed: sampling seed, so that grids of different steps are comparable.
        columns: grid columns.
        sampling: keyword arguments passed to ``generate`` (steps, guidance scale, ...).
        dataset: the data the prompts are written for. On other data (a datamodule whose
            ``dataset_name`` differs and that offers ``sample_prompts``, e.g. OpenMoji under a
            shapes config) the grid shows that datamodule's prompts instead, and says so.
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        seed: int = 0,
        columns: int = 4,
        sampling: dict | None = None,
        dataset: str = "shapes",
    ):
        super().__init__(every_n_steps)
        self.prompts, self.seed = prompts, seed
        self.columns, self.sampling, self.dataset = columns, sampling or {}, dataset

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if hasattr(pl_module, "check_sampling"):  # a wrong option fails before any training
            pl_module.check_sampling(self.sampling)
        datamodule = getattr(trainer, "datamodule", None)
        other = getattr(datamodule, "dataset_name", self.dataset)
        if other != self.dataset and hasattr(datamodule, "sample_prompts") and self.prompts:
            self.prompts = datamodule.sample_prompts(len(self.prompts))
            rank_zero_warn(f"SampleGrid: the prompts are written for {self.dataset} data; showing {other}'s "
                           f"held-out validation prompts instead: {self.prompts}")  # fmt: skip

    def make_grid(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Image.Image, str] | None:
        if not self.prompts:
            return None
        try:
            images = pl_module.generate(list(self.prompts), seed=self.seed, **self.sampling)
        except NotImplementedError as err:  # e.g. a super-resolution stage cannot start from text alone
            rank_zero_warn(f"SampleGrid disabled: {err}")
            self.prompts = []
            return None
        return captioned_grid(images, self.prompts, self.columns), " | ".join(self.prompts)
