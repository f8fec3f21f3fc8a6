"""Sizes torch's CPU thread pool to the cores that the data-loader workers leave free."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_budget(cores: int, workers: int, processes: int = 1) -> int:
    """Threads for each training process: the cores left after the loader workers, at least one."""
    return max(1, (cores - processes * workers) // processes)


class ThreadBudget(Callback):
    """Before training on a CPU, set ``torch.set_num_threads`` to the cores left after the
    data-loader workers (and other local ranks), and say so.

    Torch's default (one thread per core) next to busy loader workers or another job makes its
    OpenMP threads wait on each other: on 2 cores a training step ran 6-10 times slower than
    with one thread. A thread count the user chose is kept: ``threads``, or ``OMP_NUM_THREADS``
    / ``MKL_NUM_THREADS`` in the environment.

    Args:
        threads: a fixed thread count; None sizes it from the cores and the workers.
    """

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        chosen = next((v for v in THREAD_VARIABLES if os.environ.get(v)), None)
        if self.threads is None and chosen is not None:
            rank_zero_info(f"torch threads: {torch.get_num_threads()} ({chosen}={os.environ[chosen]})")
            return
        workers = getattr(trainer.datamodule, "num_workers", 0) or 0
        cores, processes = available_cores(), max(1, trainer.num_devices)
        threads = self.threads or thread_budget(cores, workers, processes)
        torch.set_num_threads(threads)
        why = (
            "as set"
            if self.threads
            else f"{cores} core(s), {processes} process(es) with {workers} loader worker(s) each"
        )
        rank_zero_info(f"torch threads: {threads} per process ({why}; set OMP_NUM_THREADS to choose)")
