"""How the analytic shapes scorer reads the renderer's own images, sharp and softened: a 1-pixel
Gaussian blur, a 2x down- and up-sampling (how a half-resolution method is compared), and noise,
per prompt set of the comparison protocol, with each failing check counted.

    python benchmarks/scorer_robustness.py --resolution 32 --seeds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datamodules.shapes import SCORER_VERSION, score  # noqa: E402
from evaluation.harness import Protocol, prompts_for, render_real  # noqa: E402

SOFTENINGS = {
    "renders": lambda x: x,
    "blur 1px": lambda x: TF.gaussian_blur(x, kernel_size=5, sigma=1.0),
    "2x down-up": lambda x: F.interpolate(
        F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2, mode="bilinear"
    ),
    "noise": lambda x: torch.rand_like(x) * 2 - 1,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--prompts", type=int, default=None, help="at most this many prompts per set (default: all)")
    p.add_argument("--part", default="test", help="held-out part: test, val or all")
    p.add_argument("--data-version", type=int, default=2)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    protocol = Protocol(prompts=args.prompts, seeds=args.seeds, seed=args.seed, resolution=args.resolution,
                        part=args.part, data_version=args.data_version)  # fmt: skip
    prompts = prompts_for(protocol)
    real = render_real(prompts, protocol)
    print(
        f"scorer version {SCORER_VERSION}, {args.resolution} px, shapes data v{args.data_version} {args.part} part, "
        + ", ".join(f"{n} {len(v)}" for n, v in prompts.items()) + f" prompts x {args.seeds} seeds"
    )
    print(f"{'set':16}" + "".join(f"{n:>13}" for n in SOFTENINGS) + "   failing checks (blur; down-up)")
    start = time.perf_counter()
    count = 0
    for name, items in prompts.items():
        attrs = [a for _, a in items for _ in range(args.seeds)]
        rates, fails = [], []
        for soften in SOFTENINGS.values():
            results = [score(x, a) for x, a in zip(soften(real[name].flatten(0, 1)), attrs)]
            count += len(results)
            rates.append(np.mean([r["all"] for r in results]))
            fails.append({k: sum(not r[k] for r in results) for k in results[0] if k != "all"})
        failing = [", ".join(f"{k} {v}" for k, v in f.items() if v) or "none" for f in fails[1:3]]
        print(f"{name:16}" + "".join(f"{r:13.3f}" for r in rates) + "   " + "; ".join(failing))
    print(f"{(time.perf_counter() - start) / count * 1000:.1f} ms per image scored")


if __name__ == "__main__":
    main()
