"""Two CPU processes (gloo) fit the diffusion method, the GAN and a stand-in renderer, seeded the
way LightningCLI seeds them (the same seed on every rank). Each rank writes what it drew first:
the diffusion timesteps and noise, the GAN's z, the crops and flips of its first batch, and the
held-out shapes score that the renderer got under DDP next to the one-process score.

    python tests/ddp_random_script.py OUT.json SEED
"""

import io
import json
import sys
import tempfile
from datetime import timedelta

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from callbacks import ShapesScore
from callbacks.process_group import destroy_at_exit
from datamodules import TextImageDataModule
from datamodules.shapes import heldout_prompts, objects_for, render
from datamodules.shards import ShardWriter
from lightning_modules.base import TextToImageModule
from lightning_modules.diffusion import TextToImageDiffusion
from lightning_modules.gan import TextToImageGAN
from networks.stackgan import MatchingAwareDiscriminator, StageIGenerator
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet


class RecordingDiffusion(TextToImageDiffusion):
    def training_draws(self, x0, cond_drop_prob):
        t, noise, drop = super().training_draws(x0, cond_drop_prob)
        if not hasattr(self, "first_draws"):
            self.first_draws = {"t": t.tolist(), "noise": noise.flatten()[:6].tolist()}
        return t, noise, drop


class FirstBatch(Callback):
    """The keys and the left and right edge pixels of the first training batch: crops and flips."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "seen"):
            image = batch["image"]
            self.seen = [[k, c, float(image[i, 0, 0, 0]), float(image[i, 0, 0, -1])]
                         for i, (k, c) in enumerate(zip(batch["key"], batch["caption"]))]  # fmt: skip


class SeededRenderer(TextToImageModule):
    """Draws what a held-out prompt asks for, except for seeds divisible by 3 (a blank image), so
    its score depends on each image's own seed."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scenes = dict(heldout_prompts())

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, prompts, *, seed=None, **unknown):
        self.check_sampling(unknown)
        images = []
        for p, s in zip(prompts, seed):
            img = np.asarray(
                render(objects_for(self.scenes[p], np.random.default_rng(0)), 32), dtype=np.float32
            )
            images.append(
                torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1 if s % 3 else -torch.ones(3, 32, 32)
            )
        return torch.stack(images)


def wide_shard(directory: str) -> str:
    """Eight samples, 32 wide and 16 high with a colour ramp (crops and flips show), two captions each."""
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 1, 3))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    with ShardWriter(directory, max_count=100) as w:
        for i in range(8):
            w.write(
                f"s{i}",
                {"png": buf.getvalue(), "txt": json.dumps([f"a red circle {i}", f"a blue square {i}"])},
            )
    return w.paths[0]


def trainer(find_unused_parameters=False, **kw) -> Trainer:
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60),
                           find_unused_parameters=find_unused_parameters)  # fmt: skip
    return Trainer(
        accelerator="cpu", devices=2, strategy=strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )  # fmt: skip


def text():
    return TransformerTextEncoder(width=16, depth=1, heads=2, max_length=16, tokenizer="byte")


def main(out: str, seed: int) -> None:
    destroy_at_exit()  # gloo: no abort at exit after the work is done
    seed_everything(seed, workers=True)  # what LightningCLI does: the same seed on every rank
    shard = wide_shard(tempfile.mkdtemp(prefix="ddp-random-"))  # each rank writes its own copy
    dm = TextImageDataModule(train_shards=shard, image_size=16, crop="random", hflip=True, batch_size=4,
                             num_workers=1, train_batches_per_epoch=2, shuffle_buffer=2)  # fmt: skip
    unet = UNet(
        base_channels=8, channel_mult=[1], num_res_blocks=1, attention_levels=[], context_dim=16, heads=2
    )
    diffusion = RecordingDiffusion(unet, text(), image_size=16)
    first = FirstBatch()
    trainer(max_steps=1, callbacks=[first]).fit(diffusion, datamodule=dm)

    gan = TextToImageGAN(StageIGenerator(16, image_size=16, z_dim=8, cond_dim=8, channels=32),
                         [MatchingAwareDiscriminator(16, image_size=16, channels=8, cond_dim=8)], text())  # fmt: skip
    zs = []
    gan.generator_net.register_forward_pre_hook(lambda m, args: zs.append(args[0].flatten()[:6].tolist()))
    trainer(True, max_steps=2, limit_val_batches=0).fit(gan, datamodule=dm)  # each step leaves one net unused

    renderer = SeededRenderer()
    score = ShapesScore(seeds=2, batch_size=5)
    val = TextImageDataModule(train_shards=shard, val_shards=shard, image_size=16, batch_size=2, num_workers=0,
                              train_batches_per_epoch=1, val_samples=4)  # fmt: skip
    trainer(max_steps=1, callbacks=[score], num_sanity_val_steps=0).fit(renderer, datamodule=val)

    result = {
        "draws": diffusion.first_draws,
        "batch": first.seen,
        "z": zs[0],
        "ddp_score": score.last,
        "one_process_score": ShapesScore(seeds=2, batch_size=7).evaluate(renderer),
    }
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, result)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
