"""A deterministic regression with a block-structured network and an EMA twin, trained either on
two CPU processes under ``FullyShardedStrategy`` (gloo) or on one process over the whole batch.
Writes the per-step losses, the final weights and EMA, each rank's local shard sizes and the
outputs of the trained EMA network on a fixed input, and saves a checkpoint.

    python tests/fsdp_script.py OUT_DIR {fsdp,single} STEPS [--sharded_checkpoint] [--resume CKPT]
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_modules.base import BaseModule
from lightning_modules.ema import ema_decay, ema_update
from lightning_modules.sharding import FullyShardedStrategy

GLOBAL_BATCH = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class Regression(BaseModule):
    def __init__(self, lr: float = 0.05, decay: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net()
        self.ema_net = Net().requires_grad_(False)
        self.ema_net.load_state_dict(self.net.state_dict())
        self.frozen = nn.Linear(6, 6).requires_grad_(False)  # stays whole: not sharded, not optimised

    def on_train_batch_start(self, batch, batch_idx):
        with torch.no_grad():  # the EMA samples between steps, as the grid and score callbacks make it
            self.ema_net(batch[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(self.frozen(x)) - y).square().mean()
        self.log("loss", loss)
        self.losses = [*getattr(self, "losses", []), float(loss.detach())]
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        ema_update(self.ema_net, self.net, ema_decay(self.hparams.decay, self.global_step))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=0.01)


class Batches(IterableDataset):
    """One global batch of 8 rows, every step (so that a resumed run sees what a continuous one
    does): one process reads all of it, rank ``r`` of two its half ``[4r, 4r + 4)``."""

    def __init__(self, steps: int = 100):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(GLOBAL_BATCH, 6, generator=g)
        self.y = torch.stack([self.x[:, 0] * self.x[:, 1], self.x[:, 2].sin()], 1)
        self.steps = steps

    def __iter__(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        for _ in range(self.steps):
            yield self.x[rows], self.y[rows]


def local_numel(module: nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("mode", choices=["fsdp", "single"])
    p.add_argument("steps", type=int)
    p.add_argument("--sharded_checkpoint", action="store_true")
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    seed_everything(0)
    fsdp = a.mode == "fsdp"
    model = Regression()
    strategy = FullyShardedStrategy(save_distributed_checkpoint=a.sharded_checkpoint) if fsdp else "auto"
    trainer = Trainer(accelerator="cpu", devices=2 if fsdp else 1, strategy=strategy, max_steps=a.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=a.out, use_distributed_sampler=False)  # fmt: skip
    loader = DataLoader(Batches(), batch_size=None)
    trainer.fit(model, loader, ckpt_path=a.resume)
    name = "sharded.ckpt" if a.sharded_checkpoint else "full.ckpt"
    trainer.save_checkpoint(os.path.join(a.out, name))
    probe = torch.linspace(-1, 1, 12).reshape(2, 6)
    with torch.no_grad():
        outputs = model.ema_net(probe)  # under FSDP a collective forward on every rank
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist() for k, v in model.state_dict().items()}
    result = {"losses": getattr(model, "losses", []), "state": state, "outputs": outputs.tolist(),
              "local_ema": local_numel(model.ema_net), "local_net": local_numel(model.net),
              "total_ema": sum(p.numel() for p in model.ema_net.parameters()),
              "frozen_whole": not hasattr(model.frozen.weight, "to_local"),
              "units": sum(type(m).__name__.startswith("FSDP") for m in model.net.modules())}  # fmt: skip
    with open(os.path.join(a.out, f"{a.mode}_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
