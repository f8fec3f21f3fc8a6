"""Test-only callback for the SLURM tests: each rank appends, per training batch, the attempt
(``SLURM_RESTART_COUNT``), its node, global rank, the global step and the batch's sample keys to
``<run>/probe_rank<r>.tsv``, and sleeps a little, so that a signal can arrive mid-training."""

import os
import socket
import time

from lightning.pytorch import Callback


class Probe(Callback):
    def __init__(self, sleep: float = 0.0):
        self.sleep = sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = os.path.join(trainer.default_root_dir, f"probe_rank{trainer.global_rank}.tsv")
        with open(path, "a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')}\t{os.environ.get('SLURMD_NODENAME', socket.gethostname())}"
                    f"\t{trainer.global_rank}\t{trainer.global_step}\t{','.join(batch['key'])}\n")  # fmt: skip
        time.sleep(self.sleep)
