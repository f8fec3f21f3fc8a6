"""Logs how many samples the data pipeline skipped, and why."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn


class SkippedSamplesLogger(Callback):
    """Logs ``data/skipped`` and ``data/skipped/<reason>`` (this rank's counts) at the
    trainer's logging interval, and warns with the totals at the end of fit.

    Works with any datamodule that has a ``skipped(split) -> dict[str, int]`` method.
    """

    def _counts(self, trainer, split: str) -> dict[str, int]:
        dm = trainer.datamodule
        return dm.skipped(split) if dm is not None and hasattr(dm, "skipped") else {}

    def _log(self, trainer, pl_module) -> None:
        counts = self._counts(trainer, "train")
        metrics = {"data/skipped": float(sum(counts.values()))}
        metrics.update({f"data/skipped/{k}": float(v) for k, v in counts.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log(trainer, pl_module)  # the trainer writes it out every ``log_every_n_steps``

    def on_fit_end(self, trainer, pl_module) -> None:
        for split in ("train", "val"):
            counts = self._counts(trainer, split)
            if counts:
                rank_zero_warn(f"{split} data: skipped {sum(counts.values())} sample(s) on rank 0: {counts}")
