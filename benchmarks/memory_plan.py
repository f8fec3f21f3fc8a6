"""The memory planner's estimate against a measured peak, side by side: for each config, the
planned training memory above the weights (optimizer state and the step's peak, traced on the meta
device) and the rise of a fresh process's peak resident memory over three real training steps on
this CPU (fp32, ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set).

    python benchmarks/memory_plan.py
    python benchmarks/memory_plan.py --configs configs/clip/clip_shapes.yaml --batch_sizes 64

Prints planned and measured MiB and their ratio per config and batch size.
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("import sys; sys.path.insert(0, sys.argv[1]); from scripts.plan_memory import measure; "
        "p, m = measure(sys.argv[3:], batch_size=int(sys.argv[2])); print(p, m)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["configs/diffusion/shapes32.yaml", "configs/gan/stackgan1_shapes32.yaml",
                                                    "configs/clip/clip_shapes.yaml", "configs/vae/cvae_shapes.yaml",
                                                    "configs/autoencoder/vqgan_shapes.yaml"])  # fmt: skip
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 64])
    a = p.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    print("| config | batch | planned MiB | measured MiB | planned / measured |")
    print("|---|---|---|---|---|")
    for config in a.configs:
        for batch in a.batch_sizes:
            out = subprocess.run([sys.executable, "-c", CODE, ROOT, str(batch), "--config", os.path.join(ROOT, config)],
                                 env=env, capture_output=True, text=True)  # fmt: skip
            if out.returncode != 0:
                print(f"| {config} | {batch} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            planned, measured = (int(v) for v in out.stdout.split()[-2:])
            print(f"| {config} | {batch} | {planned / 2**20:,.0f} | {measured / 2**20:,.0f} | {planned / measured:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
