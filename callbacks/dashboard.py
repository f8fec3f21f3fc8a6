"""What one W&B workspace needs to compare runs of every method: tags for the family and the
method, a group per experiment config, and throughput under ``perf/``."""

from __future__ import annotations

import os
import re
import time

import torch
from lightning.pytorch import Callback

FAMILIES = {  # module of the model class -> family tag
    "lightning_modules.diffusion": "diffusion",
    "lightning_modules.gan": "gan",
    "lightning_modules.priors": "vq",
    "lightning_modules.cvae": "vae",
    "lightning_modules.clip": "clip",
    "lightning_modules.clip_guided": "clip",
}


def run_tags(class_path: str) -> list[str]:
    """``[family, method]`` of a model class path, e.g. ``["diffusion", "text_to_image_diffusion"]``;
    autoencoders are ``vq`` (VQ-VAE, VQGAN) or ``vae`` (KL)."""
    module, _, name = class_path.rpartition(".")
    method = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    family = FAMILIES.get(module)
    if module == "lightning_modules.autoencoder":
        family = "vae" if name.startswith("KL") else "vq"
    return [t for t in (family, method) if t]


def experiment_group(config_files: list[str]) -> str | None:
    """The experiment a run belongs to: its last ``--config`` file, as ``<method dir>/<name>``."""
    if not config_files:
        return None
    path = os.path.splitext(os.path.normpath(config_files[-1]))[0]
    parts = path.split(os.sep)
    return "/".join(parts[-2:])


class Throughput(Callback):
    """Logs ``perf/samples_per_sec`` and ``perf/steps_per_sec`` (training batches, this rank times
    the world size) every ``trainer.log_every_n_steps`` batches, and on a GPU
    ``perf/max_memory_gib`` (peak allocated memory of this rank since the last log)."""

    def __init__(self):
        self._start: float | None = None
        self._samples = 0
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        size = len(batch["caption"]) if isinstance(batch, dict) and "caption" in batch else 0
        self._samples += size
        self._batches += 1
        if self._batches < max(trainer.log_every_n_steps, 1):
            return
        seconds = time.perf_counter() - self._start
        metrics = {
            "perf/samples_per_sec": self._samples * trainer.world_size / seconds,
            "perf/steps_per_sec": self._batches / seconds,
        }
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(size, 1))
        self._start, self._samples, self._batches = time.perf_counter(), 0, 0
