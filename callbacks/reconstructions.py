"""Reconstruction pairs of an autoencoder: inputs above, reconstructions below."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .images import to_pil
from .sample_grid import PeriodicGrid


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


class ReconstructionGrid(PeriodicGrid):
    """Every ``every_n_steps`` training steps and at the end of every validation, reconstruct
    ``num_images`` fixed validation images (the first of the first validation batch) with
    ``pl_module.reconstruct``; write ``<run dir>/samples/recon_<step>.png`` and log it to W&B
    under ``reconstructions``, from rank zero.

    Args:
        num_images: images in the grid.
        every_n_steps: step interval (0: only at validations).
    """

    prefix, key = "recon_", "reconstructions"

    def __init__(self, num_images: int = 8, every_n_steps: int = 0):
        super().__init__(every_n_steps)
        self.num_images = num_images
        self.images: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.images is None and batch_idx == 0 and trainer.is_global_zero:
            self.images = batch["image"][: self.num_images].detach().clone()

    def make_grid(self, trainer, pl_module) -> tuple[Image.Image, str] | None:
        if self.images is None:
            return None
        images = self.images.to(pl_module.device)
        return pair_grid(images, pl_module.reconstruct(images)), "input above, reconstruction below"
