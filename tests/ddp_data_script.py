"""Two CPU processes (gloo) train the tiny module on shapes shards; each writes what it read."""

import json
import sys
from datetime import timedelta

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy
from tiny_module import TinyRegression

from callbacks.process_group import destroy_at_exit
from datamodules import ShapesDataModule
from networks.text_encoders import TransformerTextEncoder


class Record(Callback):
    def __init__(self):
        self.train, self.val, self.shards = 0, 0, set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train += 1
        self.shards.update(int(k[len("train") :]) // 100 for k in batch["key"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val += 1


def main(root: str, out: str) -> None:
    destroy_at_exit()  # gloo: no abort at exit after the work is done
    torch.manual_seed(0)
    dm = ShapesDataModule(root=root, resolution=16, num_train=600, num_val=64, shard_size=100, batch_size=4,
                          num_workers=1, train_batches_per_epoch=4, val_samples=24)  # fmt: skip
    model = TinyRegression(TransformerTextEncoder(width=16, depth=1, heads=2, tokenizer="byte"))
    rec = Record()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[rec],
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    result = {"train_batches": rec.train, "val_batches": rec.val, "shards": sorted(rec.shards),
              "loss": float(trainer.callback_metrics["train/loss"])}  # fmt: skip
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, result)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump(dict(enumerate(gathered)), f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
