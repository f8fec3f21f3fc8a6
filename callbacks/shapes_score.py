"""The shapes scorer as a validation metric: any method, the same numbers on one dashboard."""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.shapes import DATA_VERSION, heldout_prompts, score
from lightning_modules.sharding import is_sharded

SEED_STRIDE = 100_003  # image seed = seed index * SEED_STRIDE + prompt index


class ShapesScore(Callback):
    """At the end of every validation, generate the validation half of the held-out
    single-object prompts of the shapes dataset (attribute combinations never seen in training)
    through the method's ``generate`` and log the analytic scorer's rates:
    ``val/shapes_all_correct`` and ``val/shapes_<attribute>``. The other half (``test``) is for
    reported tables only; nothing that selects a checkpoint sees it.

    Every image has its own seed (``seed index * 100003 + prompt index``), so it does not depend
    on the batch it is generated in. Under DDP the images are split across ranks and the
    per-image results gathered: the logged numbers equal the one-process ones, for a
    ``1 / world_size`` share of the generation work on each rank.

    Args:
        seeds: images per prompt.
        part: ``val`` (the default: selection happens on it), ``test`` or ``all``.
        batch_size: prompts per ``generate`` call.
        sampling: keyword arguments passed to ``generate`` (sampler, steps, guidance scale, ...).
        version: the shapes data version whose held-out prompts to use; None takes the
            datamodule's (``ShapesDataModule.version``), else the current one.
    """

    def __init__(
        self, seeds: int = 1, batch_size: int = 32, sampling: dict | None = None, part: str = "val",
        version: int | None = None,
    ):  # fmt: skip
        self.seeds, self.batch_size, self.sampling = seeds, batch_size, sampling or {}
        self.part, self.version = part, version
        self.prompts = heldout_prompts(part, version or DATA_VERSION)
        self.enabled = True
        self.last: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dataset = getattr(getattr(trainer, "datamodule", None), "dataset_name", "shapes")
        if dataset != "shapes":  # shapes prompts mean nothing to a model of other data
            rank_zero_warn(f"ShapesScore is off: the datamodule holds {dataset} data, not shapes")
            self.enabled = False
            self.release_checkpoints(trainer)
            return
        data_version = getattr(getattr(trainer, "datamodule", None), "version", None)
        if self.version is None and data_version is not None:  # the prompts held out of this data
            self.prompts = heldout_prompts(self.part, data_version)
        if hasattr(pl_module, "check_sampling"):  # a wrong option fails before any training
            pl_module.check_sampling(self.sampling)

    def release_checkpoints(self, trainer: Trainer) -> None:
        """A checkpoint callback that keeps the best by this score would fail at the first validation
        with the score off (its key is never logged): it keeps ``last.ckpt`` alone instead, and says so."""
        logged = {"val/shapes_all_correct" if k == "all" else f"val/shapes_{k}" for k in self.keys()}
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            if getattr(callback, "monitor", None) in logged and callback.save_top_k != 0:
                rank_zero_warn(f"ModelCheckpoint(monitor={callback.monitor!r}) keeps no best checkpoint: ShapesScore "
                               "is off on this data; last.ckpt is saved as always")  # fmt: skip
                callback.save_top_k = 0

    @staticmethod
    def keys() -> list[str]:
        """The scorer's attributes for the held-out prompts, in a fixed order (``all`` last)."""
        _, attrs = heldout_prompts()[0]
        return list(score(np.zeros((8, 8, 3), dtype=np.uint8), attrs))

    @torch.no_grad()
    def score_share(self, pl_module, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's share of the images, scored: (ceil(n / world_size), len(keys())) of 0/1,
        padded with rows of -1 so that every rank returns the same shape."""
        prompts, keys = self.prompts, self.keys()
        items = [(s, i) for s in range(self.seeds) for i in range(len(prompts))]
        mine = items[rank::world_size]
        share = math.ceil(len(items) / world_size)
        rows = torch.full((share, len(keys)), -1.0)
        # sharded weights: every rank runs the same number of forward passes (a short share repeats
        # its first item in a chunk of its own, generated and not scored)
        chunks = math.ceil((share if is_sharded(pl_module) else len(mine)) / self.batch_size)
        for start in range(0, chunks * self.batch_size, self.batch_size):
            chunk = mine[start : start + self.batch_size]
            if not chunk:
                pl_module.generate([prompts[items[0][1]][0]], seed=0, **self.sampling)
                continue
            images = pl_module.generate(
                [prompts[i][0] for _, i in chunk],
                seed=[s * SEED_STRIDE + i for s, i in chunk],
                **self.sampling,
            )
            for row, (image, (_, i)) in enumerate(zip(images.float().cpu(), chunk), start=start):
                result = score(image, prompts[i][1])
                rows[row] = torch.tensor([float(result[k]) for k in keys])
        return rows

    def rates(self, rows: torch.Tensor) -> dict[str, float]:
        """Mean of each attribute over the scored rows (padding dropped); ``all`` included."""
        rows = rows.reshape(-1, rows.shape[-1])
        rows = rows[rows[:, 0] >= 0]
        return {k: float(rows[:, j].mean()) for j, k in enumerate(self.keys())}

    def evaluate(self, pl_module) -> dict[str, float]:
        """The rates on one process (every image generated here)."""
        return self.rates(self.score_share(pl_module))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        try:
            rows = self.score_share(pl_module, trainer.global_rank, trainer.world_size)
        except NotImplementedError as err:  # e.g. a super-resolution stage cannot start from text alone
            rank_zero_warn(f"ShapesScore disabled: {err}")
            self.enabled = False
            self.release_checkpoints(trainer)
            return
        if trainer.world_size > 1:
            rows = pl_module.all_gather(rows.to(pl_module.device)).cpu()  # (world, n, keys)
        self.last = self.rates(rows)
        for name, value in self.last.items():
            key = "val/shapes_all_correct" if name == "all" else f"val/shapes_{name}"
            pl_module.log(key, value, sync_dist=True)  # equal on every rank: the mean is the value
