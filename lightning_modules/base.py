"""What every text-to-image method shares: the ``generate`` contract and ``predict``."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor


class TextToImageModule(LightningModule):
    """Base of every method.

    Subclasses implement ``generate(prompts, *, seed=None, **sampling) -> (b, 3, h, w)`` in
    [-1, 1]. Callbacks, ``predict``, evaluation and comparisons use only that method.
    """

    def generate(self, prompts: list[str], *, seed: int | None = None, **sampling) -> Tensor:
        raise NotImplementedError

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """A batch of prompt dicts (``caption``, ``seed``, ``index``) -> the batch plus ``image``."""
        images = []
        for caption, seed in zip(batch["caption"], batch["seed"]):
            images.append(self.generate([caption], seed=int(seed))[0])
        return {**batch, "image": torch.stack(images)}

    @staticmethod
    def generator(seed: int | None, device: torch.device) -> torch.Generator | None:
        """A seeded generator on ``device`` (None: use the global RNG)."""
        if seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        return g
