"""A tiny test-only method: a text encoder and a linear decoder trained by regression."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.base import TextToImageModule


class TinyRegression(TextToImageModule):
    """Maps the pooled caption embedding straight to pixels with an MSE loss."""

    def __init__(
        self, text_encoder: nn.Module, image_size: int = 16, optimizer: OptimizerCallable = torch.optim.Adam
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder"])
        self.text_encoder = text_encoder
        self.image_size = image_size
        self.decoder = nn.Linear(text_encoder.dim, 3 * image_size * image_size)
        self.optimizer = optimizer

    def forward(self, captions):
        pooled = self.text_encoder(captions).pooled
        return torch.tanh(self.decoder(pooled)).view(-1, 3, self.image_size, self.image_size)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch["caption"]), batch["image"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch["caption"]), batch["image"])
        self.log("val/loss", loss, sync_dist=True)

    def generate(self, prompts, *, seed=None, **sampling):
        with torch.no_grad():
            return self(prompts)

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


class ColourStats(nn.Module):
    """A feature network for FID tests: each channel's mean and standard deviation (6 features)
    of images in [0, 1]."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)
