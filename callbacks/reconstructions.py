"""Reconstruction pairs of an autoencoder: inputs above, reconstructions below."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from .images import to_pil


def pair_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, min_tile: int = 64) -> Image.Image:
    """Two rows: ``inputs`` above their ``reconstructions`` (both (b, 3, h, w) in [-1, 1])."""
    tiles = [to_pil(x) for x in torch.cat([inputs, reconstructions])]
    side = max(min_tile, tiles[0].width)
    tiles = [t.resize((side, side), Image.NEAREST) for t in tiles]
    b = len(inputs)
    canvas = np.full((2 * side + 2, b * side, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, b)
        canvas[row * (side + 2) : row * (side + 2) + side, col * side : (col + 1) * side] = np.asarray(tile)
    return Image.fromarray(canvas)


class ReconstructionGrid(Callback):
    """Every ``every_n_steps`` training steps and at the end of every validation, reconstruct
    ``num_images`` fixed validation images (the first of the first validation batch) with
    ``pl_module.reconstruct``; write ``<run dir>/samples/recon_<step>.png`` and log it to W&B
    under ``reconstructions``, from rank zero.

    Args:
        num_images: images in the grid.
        every_n_steps: step interval (0: only at validations).
    """

    def __init__(self, num_images: int = 8, every_n_steps: int = 0):
        self.num_images, self.every_n_steps = num_images, every_n_steps
        self.images: torch.Tensor | None = None
        self._last_step, self._last_interval = -1, 0

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.images is None and batch_idx == 0 and trainer.is_global_zero:
            self.images = batch["image"][: self.num_images].detach().clone()

    def log_grid(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        if not trainer.is_global_zero or self.images is None or trainer.global_step == self._last_step:
            return None
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = self.images.to(pl_module.device)
            grid = pair_grid(images, pl_module.reconstruct(images))
        finally:
            pl_module.train(was_training)
        out_dir = os.path.join(trainer.default_root_dir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"recon_{trainer.global_step:07d}.png")
        grid.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="reconstructions", images=[grid], caption=["input above, reconstruction below"],
                                 step=trainer.global_step)  # fmt: skip
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step // self.every_n_steps > self._last_interval:
            self._last_interval = trainer.global_step // self.every_n_steps
            self.log_grid(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.log_grid(trainer, pl_module)
