"""Framework overhead: training steps/s of TextToImageDiffusion under Lightning vs. a plain
PyTorch loop doing the same work (same network, batch, optimizer), in one run.

    python benchmarks/diffusion_overhead.py --steps 30 --batch 32 --resolution 16
"""

import argparse
import time

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_modules.diffusion import TextToImageDiffusion
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet


def build(resolution: int) -> TextToImageDiffusion:
    torch.manual_seed(0)
    unet = UNet(
        base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_levels=[1, 2], context_dim=128
    )
    text = TransformerTextEncoder(width=128, depth=2, heads=4, max_length=24, tokenizer="bpe")
    return TextToImageDiffusion(unet, text, image_size=resolution)


def batches(n: int, batch: int, resolution: int, device: str):
    g = torch.Generator().manual_seed(0)
    captions = [f"a small red circle number {i}" for i in range(batch)]
    return [{"image": torch.rand(batch, 3, resolution, resolution, generator=g).to(device) * 2 - 1,
             "caption": captions} for _ in range(n)]  # fmt: skip


def plain_loop(model, data) -> float:
    opt = model.configure_optimizers()
    model.train()
    start = time.perf_counter()
    for i, batch in enumerate(data):
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_ema(i)  # the same EMA update
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def lightning_loop(model, data, accelerator: str) -> float:
    trainer = Trainer(max_steps=len(data), accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=16)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = batches(a.steps, a.batch, a.resolution, device)
    results = {}
    for _round in range(2):  # alternate, so that drifting machine load hits both alike
        for name in ("plain", "lightning"):
            model = build(a.resolution).to(device)
            plain_loop(model, data[: a.warmup])  # warm-up (allocator, kernels)
            rate = (
                plain_loop(model, data)
                if name == "plain"
                else lightning_loop(model, data, "gpu" if device == "cuda" else "cpu")
            )
            results.setdefault(name, []).append(rate)
    plain, light = max(results["plain"]), max(results["lightning"])
    print(f"device={device} batch={a.batch} res={a.resolution} steps={a.steps}")
    print(f"plain loop  : {plain:.3f} steps/s")
    print(f"lightning   : {light:.3f} steps/s")
    print(f"ratio lightning/plain = {light / plain:.3f}  (overhead {100 * (1 - light / plain):.1f}%)")


if __name__ == "__main__":
    main()
