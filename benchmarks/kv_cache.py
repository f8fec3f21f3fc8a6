"""Autoregressive sampling with the KV cache against full recomputation (taming-transformers'
sampler), side by side in one run: the same network, prompts and seeds, so the tokens must be
identical. Weights do not change the cost: the transformer is built untrained.

    python benchmarks/kv_cache.py --tokens 256 1024

Prints, per sequence length, seconds per batch with and without the cache, the speed-up, and
whether the tokens are identical.
"""

import argparse
import math
import time

import torch

from networks.text_encoders import TextEncoding
from networks.transformer import TokenTransformer, sample_autoregressive


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="image tokens (square grids)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0, help="1 disables guidance (no doubled batch)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"width {a.width}, depth {a.depth}, batch {a.batch}, guidance {a.guidance}, {device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'tokens':>7}{'cache (s)':>11}{'full (s)':>10}{'speed-up':>10}  same tokens")
    for n in a.tokens:
        side = math.isqrt(n)
        torch.manual_seed(0)
        net = TokenTransformer(
            1024, side, a.width, a.depth, a.heads, conditioning="cross", context_dim=a.width
        )
        net = net.to(device).eval()
        rows = 2 * a.batch if a.guidance != 1.0 else a.batch
        text = TextEncoding(torch.randn(rows, 16, a.width, device=device),
                            torch.ones(rows, 16, dtype=torch.bool, device=device), torch.zeros(rows, a.width))  # fmt: skip

        def run(cache, net=net, text=text):
            gens = [torch.Generator(device).manual_seed(s) for s in range(a.batch)]
            return sample_autoregressive(net, None, text, gens, 1.0, None, None, a.guidance, use_cache=cache)

        run(True)  # warm-up
        cached, t_cache = timed(lambda: run(True))
        full, t_full = timed(lambda: run(False))
        print(
            f"{side * side:>7}{t_cache:>11.2f}{t_full:>10.2f}{t_full / t_cache:>9.1f}x  {torch.equal(cached, full)}"
        )


if __name__ == "__main__":
    main()
