"""Generation speed of any methods side by side in one run: images per second of each method's
``generate`` on the same prompts, batch and device, rounds alternating between the methods so
that drifting load hits all alike. A method is a trained checkpoint (its quality is then the one
measured on it) or an experiment config built untrained (weights do not change the cost).

    python benchmarks/family_speed.py --batch 32 \\
        ar=runs/ar/checkpoints/last.ckpt maskgit=runs/maskgit/checkpoints/last.ckpt \\
        'maskgit 8 steps=runs/maskgit/checkpoints/last.ckpt:{"steps": 8}' \\
        latent=runs/ldm/checkpoints/last.ckpt pixel=configs/diffusion/shapes32.yaml

Each method is ``name=path`` with optional ``:{json}`` options of ``generate``.
"""

import argparse
import json
import time

import torch
from common import build_model, load, model_section  # benchmarks/common.py


def parse(spec: str) -> tuple[str, str, dict]:
    name, rest = spec.split("=", 1)
    path, options = rest, {}
    if ":{" in rest:
        path, raw = rest.split(":{", 1)
        options = json.loads("{" + raw)
    return name, path, options


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("methods", nargs="+", help="name=checkpoint-or-config[:{json options}]")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, runs = {}, {}
    for spec in a.methods:
        name, path, options = parse(spec)
        if path not in models:
            models[path] = (
                (load(path) if path.endswith(".ckpt") else build_model(model_section(path))).to(device).eval()
            )
        runs[name] = (models[path], options)
    sizes = {m.image_size for m, _ in runs.values()}
    prompts = [f"a small red circle on the left {i}" for i in range(a.batch)]
    for model, options in runs.values():  # warm-up
        model.generate(prompts[:2], seed=0, **options)
    times = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, (model, options) in runs.items():
            start = time.perf_counter()
            model.generate(prompts, seed=0, **options)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"{'/'.join(map(str, sorted(sizes)))} px, batch {a.batch}, {device}, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} rounds")  # fmt: skip
    rates = {name: a.batch / sorted(t)[len(t) // 2] for name, t in times.items()}
    fastest = max(rates.values())
    print(f"{'method':<28}{'img/s':>10}{'slower than the fastest':>26}")
    for name, r in rates.items():
        print(f"{name:<28}{r:>10.2f}{fastest / r:>25.1f}x")


if __name__ == "__main__":
    main()
