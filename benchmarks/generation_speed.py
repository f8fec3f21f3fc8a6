"""Generation speed, side by side in one run: images per second of a GAN's ``generate`` and of
the diffusion module's ``generate`` (per sampler) at the same resolution, same batch, same
device. Weights do not change the cost, so the networks are built from the configs untrained
(or pass checkpoints). Rounds alternate between the methods so drifting load hits both alike.

    python benchmarks/generation_speed.py --gan configs/gan/stackgan1_shapes.yaml \\
        --diffusion configs/diffusion/shapes.yaml --batch 32
"""

import argparse
import time

import torch
from common import build_model, load, model_section  # benchmarks/common.py


def time_generate(model, prompts, rounds_time: list, **sampling) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompts, seed=0, **sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rounds_time.append(time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gan", default="configs/gan/stackgan1_shapes.yaml", help="experiment config or .ckpt")
    p.add_argument("--diffusion", default="configs/diffusion/shapes.yaml", help="experiment config or .ckpt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samplers", default="dpmpp_2m:20,ddim:50,ddpm:1000")
    a = p.parse_args()
    gan = load(a.gan) if a.gan.endswith(".ckpt") else build_model(model_section(a.gan))
    size = gan.image_size
    if a.diffusion.endswith(".ckpt"):
        diffusion = load(a.diffusion)
    else:  # the UNet is resolution-agnostic: build the diffusion model at the GAN's resolution
        diffusion = build_model(model_section(a.diffusion), {"image_size": size})
    if diffusion.image_size != size:
        raise SystemExit(
            f"the GAN makes {size} px images, the diffusion checkpoint {diffusion.image_size} px"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gan, diffusion = gan.to(device).eval(), diffusion.to(device).eval()
    prompts = [f"a small red circle on the left {i}" for i in range(a.batch)]
    runs = {"gan": (gan, {})}
    for spec in a.samplers.split(","):
        name, steps = spec.split(":")
        runs[f"diffusion {name}-{steps}"] = (diffusion, {"sampler": name, "steps": int(steps)})
    for model, sampling in runs.values():  # warm-up
        model.generate(prompts[:2], seed=0, **{**sampling, **({"steps": 2} if sampling else {})})
    times = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, (model, sampling) in runs.items():
            time_generate(model, prompts, times[name], **sampling)
    print(f"{size} px, batch {a.batch}, {device}, median of {a.rounds} rounds")
    gan_rate = a.batch / sorted(times["gan"])[len(times["gan"]) // 2]
    print(f"{'method':<24}{'img/s':>10}{'GAN speed-up':>14}")
    for name, t in times.items():
        r = a.batch / sorted(t)[len(t) // 2]
        print(f"{name:<24}{r:>10.1f}{gan_rate / r:>13.1f}x")


if __name__ == "__main__":
    main()
