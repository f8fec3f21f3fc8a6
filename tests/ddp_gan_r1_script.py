"""Two CPU processes (gloo) train a tiny StackGAN stage I with lazy R1 (every 2nd discriminator
step) on different batches; rank zero writes, per rank, the discriminator steps at which the
penalty ran, a fingerprint of the batches it saw and a checksum of the discriminator's weights."""

import json
import sys
from datetime import timedelta

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from callbacks.process_group import destroy_at_exit
from lightning_modules.gan import TextToImageGAN
from networks.stackgan import MatchingAwareDiscriminator, StageIGenerator
from networks.text_encoders import TransformerTextEncoder


class Recording(TextToImageGAN):
    def on_train_start(self):
        self.r1_steps, self.batches = [], []

    def training_step(self, batch, batch_idx):
        self.batches.append(float(batch["image"].sum()))
        return super().training_step(batch, batch_idx)

    def d_loss(self, reals, fakes, sentence, regularise=False):
        loss, logs = super().d_loss(reals, fakes, sentence, regularise)
        if "r1_0" in logs:
            self.r1_steps.append(self.steps["d"] + 1)
        return loss, logs


def main(out: str) -> None:
    destroy_at_exit()
    torch.manual_seed(0)
    text = TransformerTextEncoder(width=16, depth=1, heads=2, max_length=16, tokenizer="byte")
    model = Recording(StageIGenerator(16, image_size=16, z_dim=8, cond_dim=8, channels=16),
                      [MatchingAwareDiscriminator(16, image_size=16, channels=8, cond_dim=8, norm="none")], text,
                      loss="hinge", r1_weight=1.0, r1_interval=2)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "caption": [f"a block number {i}"] * 4}
            for i in range(12)]  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=2, max_steps=12, logger=False, enable_checkpointing=False,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True, timeout=timedelta(seconds=60)),
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=None))
    checksum = float(sum(p.detach().double().sum() for p in model.discriminators.parameters()))
    mine = {"r1_steps": model.r1_steps, "batches": model.batches, "d_checksum": checksum}
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, mine)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


if __name__ == "__main__":
    main(sys.argv[1])
