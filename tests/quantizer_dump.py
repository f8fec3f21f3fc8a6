"""A callback for the DDP tests: at the end of training every rank writes its quantizer's state
and the number of codes it restarted to ``<run dir>/quantizer_rank<r>.pt``."""

import os

import torch
from lightning.pytorch import Callback


class DumpQuantizer(Callback):
    def setup(self, trainer, pl_module, stage):
        self.restarted = 0
        original = pl_module.quantizer.restart_dead_codes

        def counting(flat):
            n = original(flat)
            self.restarted += n
            return n

        pl_module.quantizer.restart_dead_codes = counting

    def on_train_end(self, trainer, pl_module):
        q = pl_module.quantizer
        torch.save({"codebook": q.codebook.detach().cpu(), "ema_count": q.ema_count.cpu(), "restarted": self.restarted,
                    "decoder": pl_module.decoder.last_layer.detach().cpu(),
                    "discriminator": [p.detach().cpu() for p in pl_module.discriminator.parameters()]},
                   os.path.join(trainer.default_root_dir, f"quantizer_rank{trainer.global_rank}.pt"))  # fmt: skip
