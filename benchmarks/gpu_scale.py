"""Training throughput, peak memory and MFU of a method's config, across batch sizes, precision,
torch.compile and activation checkpointing, side by side in one run; and whether the shard loader
keeps up with the fastest step.

    python benchmarks/gpu_scale.py --config configs/diffusion/shards_gpu.yaml --batch 32,64,128 \
        --precision bf16-mixed,32-true --compile off,on --checkpointing off,on
    python benchmarks/gpu_scale.py --small     # a tiny version on a CPU (what the tests run)

Each row trains the config's model with Lightning for ``--warmup`` steps, then times ``--steps``
steps (synchronised on a GPU) on synthetic batches in memory, so the loader is not in the way.
FLOPs per step are counted once with ``torch.utils.flop_counter`` (forward, backward and the
optimizer). MFU is those FLOPs per second over the GPU's dense bf16 peak (``--peak-tflops``; known
for H100 and H200: 989), whatever the row's precision. A pretrained text encoder that needs local
weights is replaced by a transformer text encoder of the same width (its cost is small beside the
denoiser's; the row says so). ``--loader`` renders shapes shards at the config's resolution and
measures the datamodule's batches per second with the config's workers: the share of the fastest
step rate it sustains is how busy it can keep the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import build_model, model_section  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, without sparsity


class Batches(IterableDataset):
    """The same synthetic batch forever: images in [-1, 1] and captions of the shapes kind."""

    def __init__(self, batch: int, size: int):
        self.batch = {"image": torch.rand(batch, 3, size, size) * 2 - 1,
                      "caption": [f"a {c} circle on the left" for c in ("red", "blue", "green", "white") * (batch // 4 + 1)][:batch],
                      "key": [str(i) for i in range(batch)], "meta": [{}] * batch}  # fmt: skip

    def __iter__(self):
        while True:
            yield self.batch


class Synthetic(LightningDataModule):
    def __init__(self, batch: int, size: int):
        super().__init__()
        self.batch, self.size = batch, size

    def train_dataloader(self):
        return DataLoader(Batches(self.batch, self.size), batch_size=None)


class StepClock(Callback):
    """Counts one step's FLOPs during the warm-up, then times the steps after it."""

    def __init__(self, warmup: int):
        self.warmup, self.flops, self.start, self.seconds, self.timed = warmup, 0, None, 0.0, 0
        self.counter = None

    @staticmethod
    def _sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            from torch.utils.flop_counter import FlopCounterMode

            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()
        if batch_idx == self.warmup:
            self._sync(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops = self.counter.get_total_flops()
            self.counter = None
        if self.start is not None:
            self._sync(pl_module.device)
            self.seconds = time.perf_counter() - self.start
            self.timed = batch_idx - self.warmup + 1


def model_config(config: str, small: bool, checkpointing: bool) -> tuple[dict, int, str]:
    """The config's ``model`` section, made runnable here: ``(section, image size, note)``."""
    section = model_section(config)
    args = dict(section.get("init_args") or {})
    note = ""
    text = args.get("text_encoder")
    if isinstance(text, dict) and text.get("class_path", "").endswith("PretrainedTextEncoder"):
        width = (args.get("denoiser") or {}).get("init_args", {}).get("context_dim", 512)
        args["text_encoder"] = {"class_path": "networks.text_encoders.TransformerTextEncoder",
                                "init_args": {"width": width, "depth": 2, "heads": 8, "max_length": 64}}  # fmt: skip
        note = "text encoder: a 2-layer transformer in place of the pretrained one" if not small else ""
    denoiser = args.get("denoiser")
    if isinstance(denoiser, dict):
        d_args = dict(denoiser.get("init_args") or {})
        if small:
            d_args.update(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], heads=2,
                          context_dim=32)  # fmt: skip
            args["text_encoder"] = {"class_path": "networks.text_encoders.TransformerTextEncoder",
                                    "init_args": {"width": 32, "depth": 1, "heads": 2, "max_length": 16}}  # fmt: skip
        d_args["checkpointing"] = checkpointing
        args["denoiser"] = {**denoiser, "init_args": d_args}
    if small:
        args["image_size"] = 16
    opt = args.get("optimizer")
    if isinstance(opt, dict) and not torch.cuda.is_available():
        args["optimizer"] = {**opt, "init_args": {k: v for k, v in (opt.get("init_args") or {}).items() if k != "fused"}}
    return {**section, "init_args": args}, int(args.get("image_size", 64)), note


def measure(config: str, batch: int, precision: str, compiled: bool, checkpointing: bool, steps: int,
            warmup: int, small: bool, peak_tflops: float | None) -> dict:  # fmt: skip
    section, size, note = model_config(config, small, checkpointing)
    model = build_model(section)
    callbacks = [StepClock(warmup)]
    if compiled:
        from callbacks import CompileNetworks

        callbacks.append(CompileNetworks())
    trainer = Trainer(accelerator="auto", devices=1, precision=precision, max_steps=warmup + steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=Synthetic(batch, size))
    clock = callbacks[0]
    step_s = clock.seconds / max(clock.timed, 1)
    device = model.device
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tflops = clock.flops / step_s / 1e12 if step_s else 0.0
    return {"config": os.path.basename(config), "batch": batch, "precision": precision, "compile": compiled,
            "checkpointing": checkpointing, "img_s": batch / step_s if step_s else 0.0, "step_ms": step_s * 1e3,
            "peak_gib": peak, "gflop_step": clock.flops / 1e9, "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None, "note": note}  # fmt: skip


def loader_rate(config: str, batch: int, seconds: float = 20.0) -> tuple[float, int]:
    """Batches per second the config's datamodule delivers from shapes shards at its resolution."""
    import yaml

    from datamodules import TextImageDataModule
    from datamodules.shapes import write_shapes_shards

    with open(config) as f:
        cfg = yaml.safe_load(f)
    data = cfg.get("data")
    if isinstance(data, str):
        with open(os.path.join(os.path.dirname(config), data)) as f:
            data = yaml.safe_load(f)
    init = (data or {}).get("init_args") or {}
    size = int(init.get("image_size") or model_section(config).get("init_args", {}).get("image_size", 64))
    workers = int(init.get("num_workers", 4))
    root = tempfile.mkdtemp(prefix="gpu_scale_")
    write_shapes_shards(root, resolution=size, num_train=max(8 * batch, 2000), num_val=8, shard_size=250)
    dm = TextImageDataModule(train_shards=os.path.join(root, "train"), image_size=size, batch_size=batch,
                             num_workers=workers, train_batches_per_epoch=10**6)  # fmt: skip
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    return n / (time.perf_counter() - start), workers


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/diffusion/shards_gpu.yaml")
    p.add_argument("--batch", default="32,64,128")
    p.add_argument("--precision", default="bf16-mixed,32-true")
    p.add_argument("--compile", default="off,on")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known GPUs)")
    p.add_argument("--loader", action="store_true", help="also measure the shard loader against the fastest step")
    p.add_argument("--small", action="store_true", help="a tiny version for a CPU (tests)")
    a = p.parse_args(argv)
    if a.small:
        a.batch, a.precision, a.compile, a.steps, a.warmup = "2", "32-true", "off", 2, 2
    peak = a.peak_tflops
    if peak is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    on = {"on": True, "off": False}
    rows = []
    for batch, precision, compiled, ckpt in itertools.product(
        [int(b) for b in a.batch.split(",")], a.precision.split(","),
        [on[c] for c in a.compile.split(",")], [on[c] for c in a.checkpointing.split(",")],
    ):  # fmt: skip
        try:
            rows.append(measure(a.config, batch, precision, compiled, ckpt, a.steps, a.warmup, a.small, peak))
        except torch.cuda.OutOfMemoryError:
            rows.append({"config": os.path.basename(a.config), "batch": batch, "precision": precision,
                         "compile": compiled, "checkpointing": ckpt, "note": "out of memory"})  # fmt: skip
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{device}; MFU against {peak or '?'} dense bf16 TFLOP/s; {a.steps} timed steps after {a.warmup}")
    print("| config | batch | precision | compile | checkpointing | img/s | step ms | peak GiB | GFLOP/step | TFLOP/s | MFU | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['precision']} | {r['compile']} | {r['checkpointing']} | "
              f"{fmt(r.get('img_s'), '.1f')} | {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('peak_gib'), '.2f')} | "
              f"{fmt(r.get('gflop_step'), '.3g')} | {fmt(r.get('tflops'), '.3g')} | {fmt(r.get('mfu'), '.1%')} | {r.get('note', '')} |")  # fmt: skip
    if a.loader:
        best = max((r for r in rows if r.get("img_s")), key=lambda r: r["img_s"])
        rate, workers = loader_rate(a.config, best["batch"])
        need = best["img_s"] / best["batch"]
        print(f"loader: {rate:.2f} batches/s of {best['batch']} with {workers} workers; the fastest step needs "
              f"{need:.2f}/s: it keeps the device {min(rate / need, 1.0):.0%} busy")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
