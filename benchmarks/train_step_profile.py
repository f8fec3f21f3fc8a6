"""Where one training step of the main job goes on a CPU, and what removing the waste gains:
the same model, batches and draws, stepped with the former settings and the current ones, in
one run.

    python benchmarks/train_step_profile.py --steps 30

Parts of a step: the data (decoding and transforming a batch in the main process), the text
encoder's forward pass, the UNet's forward pass and loss, the backward pass (both networks),
the optimizer step and the EMA update. Variants:

- ``foreach AdamW``: the optimizer the configs used before (``torch.optim.AdamW`` defaults).
  Its per-tensor passes over the 49k-token BPE embedding table (6.3M of the model's 8.2M
  trainable parameters, for captions that use a few dozen tokens) cost as much as the UNet's
  last layers.
- ``fused AdamW``: ``fused: true``, one kernel over all parameters (what the configs use now).
- Each at 1 thread and at the cores' count, to show what thread oversubscription costs.
"""

import argparse
import os
import tempfile
import time

import torch
from common import build_model, model_section  # benchmarks/common.py

from datamodules import ShapesDataModule

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "diffusion", "shapes.yaml"
)


def batches(n: int, batch_size: int, root: str) -> tuple[list[dict], float]:
    """``n`` batches from the main job's data, and the seconds the data takes per batch."""
    dm = ShapesDataModule(root=root, resolution=16, num_train=4000, num_val=64, batch_size=batch_size, num_workers=0,
                          train_batches_per_epoch=n + 1)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # the shuffle buffer fills on the first batch
    start = time.perf_counter()
    out = [dm.on_before_batch_transfer(next(it), 0) for _ in range(n)]
    return out, (time.perf_counter() - start) / n


def profile(data: list[dict], fused: bool, threads: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds of each part of a training step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_section(CONFIG), {"image_size": 16}).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0, fused=fused)
    parts: dict[str, list[float]] = {
        k: [] for k in ("text encoder", "unet + loss", "backward", "optimizer", "ema")
    }
    for i, batch in enumerate(data):
        times = []
        t0 = time.perf_counter()
        x0 = batch["image"]
        t, noise, drop = model.training_draws(x0, model.cond_drop_prob)
        text = model.encode(["" if d else c for c, d in zip(batch["caption"], drop)])
        times.append(time.perf_counter())
        out = model.denoiser(model.schedule.add_noise(x0, noise, t), t, text)
        target = model.schedule.target(model.prediction, x0, noise, t)
        weights = model.schedule.loss_weight(model.prediction, t, model.min_snr_gamma)
        loss = ((out - target).pow(2).flatten(1).mean(1) * weights).mean()
        times.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        times.append(time.perf_counter())
        opt.step()
        times.append(time.perf_counter())
        model.update_ema(i)
        times.append(time.perf_counter())
        if i >= warmup:
            for name, a, b in zip(parts, [t0, *times], times):
                parts[name].append((b - a) * 1000)
    return {k: sorted(v)[len(v) // 2] for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "t2i-bench-shapes16"))
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data, data_ms = batches(a.steps, a.batch, a.data_root)
    data_ms *= 1000
    print(
        f"main job step (16 px, batch {a.batch}), {cores} cores; data: {data_ms:.1f} ms a batch in the main process"
    )
    variants = [("foreach AdamW", False, 1), ("fused AdamW", True, 1), ("foreach AdamW", False, cores),
                ("fused AdamW", True, cores)]  # fmt: skip
    rows = []
    for name, fused, threads in variants:
        parts = profile(data, fused, threads)
        total = sum(parts.values()) + data_ms
        rows.append((f"{name}, {threads} thread(s)", parts, total))
    names = list(rows[0][1])
    print(
        f"{'variant':<28}" + "".join(f"{n:>14}" for n in ["data", *names]) + f"{'step ms':>10}{'steps/s':>9}"
    )
    for label, parts, total in rows:
        print(f"{label:<28}{data_ms:>14.1f}" + "".join(f"{parts[n]:>14.1f}" for n in names) + f"{total:>10.1f}{1000 / total:>9.2f}")  # fmt: skip
    before, after = rows[2][2], rows[3][2]
    print(f"fused / foreach at {cores} threads: {before / after:.2f}x steps per second")
    print(f"{cores} threads / 1 thread (fused): {rows[1][2] / rows[3][2]:.2f}x steps per second")


if __name__ == "__main__":
    main()
