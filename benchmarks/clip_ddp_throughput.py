"""Global-batch negatives scale: CLIP training steps of the shapes config (configs/clip/clip_shapes.yaml)
with 1 process and with 2 processes (DDP, gloo on CPU or NCCL on GPUs), the same per-process
batch. With 2 processes every step sees twice the pairs and every pair twice the negatives
(features all-gathered with their gradient). Prints samples per second (all processes together),
the ratio and peak memory per process. Gradients are averaged with one all-reduce of a flat
bucket after backward (what DDP does, without its overlap with the backward pass).

    python benchmarks/clip_ddp_throughput.py --batch 64 --steps 30
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import build_model, model_section  # noqa: E402  (benchmarks/common.py)

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "clip", "clip_shapes.yaml")
COLOURS, SHAPES = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle"]


def worker(rank: int, world: int, batch: int, steps: int, threads: int, port: int, out: str) -> None:
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(rank)
    model = build_model(model_section(CONFIG)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    captions = [f"a {COLOURS[i % 5]} {SHAPES[i % 3]} number {i}" for i in range(batch)]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            img = model.encode_image(images)
            txt = model.encode_text(captions)
            loss = model.loss(img, txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # DDP's gradient average, in one flat bucket
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat / world, grads)):
                g.copy_(r)
        opt.step()

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{seconds} {memory}")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, batch: int, steps: int, threads: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        mp.spawn(worker, args=(world, batch, steps, threads, 29500 + os.getpid() % 1000, out), nprocs=world)
        seconds, memory = map(float, open(out).read().split())
    return world * batch * steps / seconds, memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64, help="pairs per process and step")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    cores = os.cpu_count() or 1
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {cores} cores"
    one, mem1 = run(1, a.batch, a.steps, max(cores // 2, 1))  # the same cores per process in both runs
    two, mem2 = run(2, a.batch, a.steps, max(cores // 2, 1))
    unit = "MiB GPU peak" if torch.cuda.is_available() else "MiB peak RSS"
    print(f"{device}; per-process batch {a.batch}, {a.steps} steps, {max(cores // 2, 1)} thread(s) per process")
    print(f"1 process : {one:8.1f} samples/s, {a.batch:4d} negatives per pair, {mem1:.0f} {unit}")
    print(f"2 processes: {two:8.1f} samples/s, {2 * a.batch:4d} negatives per pair, {mem2:.0f} {unit} per process")
    print(f"scaling 2 vs 1: {two / one:.2f}x (ideal 2.00x)")


if __name__ == "__main__":
    main()
