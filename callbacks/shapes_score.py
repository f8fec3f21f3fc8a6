"""The shapes scorer as a validation metric: any method, the same numbers on one dashboard."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.shapes import heldout_prompts, score_batch


class ShapesScore(Callback):
    """At the end of every validation, generate the held-out single-object prompts of the
    shapes dataset (attribute combinations never seen in training) through the method's
    ``generate`` and log the analytic scorer's rates: ``val/shapes_all_correct`` and
    ``val/shapes_<attribute>``.

    Every rank generates the same images (same prompts, same seeds), so the logged mean is
    the single-process value; nothing is gathered.

    Args:
        seeds: images per prompt (seeds ``0..seeds-1``).
        batch_size: prompts per ``generate`` call.
        sampling: keyword arguments passed to ``generate`` (sampler, steps, guidance scale, ...).
    """

    def __init__(self, seeds: int = 1, batch_size: int = 32, sampling: dict | None = None):
        self.seeds, self.batch_size, self.sampling = seeds, batch_size, sampling or {}
        self.enabled = True

    @torch.no_grad()
    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        prompts = heldout_prompts()
        images, attrs = [], []
        for seed in range(self.seeds):
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i : i + self.batch_size]
                out = pl_module.generate([c for c, _ in chunk], seed=seed * 100_003 + i, **self.sampling)
                images.extend(out.float().cpu())
                attrs.extend(a for _, a in chunk)
        return score_batch(images, attrs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        try:
            rates = self.evaluate(pl_module)
        except NotImplementedError as err:  # e.g. a super-resolution stage cannot start from text alone
            rank_zero_warn(f"ShapesScore disabled: {err}")
            self.enabled = False
            return
        for name, value in rates.items():
            key = "val/shapes_all_correct" if name == "all" else f"val/shapes_{name}"
            pl_module.log(key, value, sync_dist=True)
