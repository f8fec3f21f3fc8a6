"""Two CPU processes (gloo) train the tiny module on shards with bad samples, then save (and, with
``--resume``, first restore) ``last.ckpt``; rank zero writes every rank's own skip counts."""

import json
import os
import sys
from datetime import timedelta

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from tiny_module import TinyRegression

from callbacks.process_group import destroy_at_exit
from callbacks.stopping import SaveLastCheckpoint
from datamodules import TextImageDataModule
from networks.text_encoders import TransformerTextEncoder


def main(shards: str, run_dir: str, out: str, max_steps: int, resume: bool) -> None:
    destroy_at_exit()
    torch.manual_seed(0)
    dm = TextImageDataModule(train_shards=shards, image_size=16, batch_size=4, num_workers=0,
                             train_batches_per_epoch=1000, shuffle_buffer=4, seed=0)  # fmt: skip
    model = TinyRegression(TransformerTextEncoder(width=16, depth=1, heads=2, tokenizer="byte"))
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir, callbacks=[SaveLastCheckpoint()],
    )  # fmt: skip
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    trainer.fit(model, dm, ckpt_path=last if resume else None, weights_only=False)  # hparams hold a class
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, dm.skipped("train"))  # after the save at the end
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": gathered, "step": trainer.global_step}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:] == ["--resume"])
