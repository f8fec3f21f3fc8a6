"""Pre-tokenise shards for a token prior: every sample keeps its members and gains
``{key}.tokens.npy``, its image's codes under a trained VQ autoencoder (the centre crop at the
autoencoder's image size, as the datamodule makes it). The priors then read the codes instead of
encoding every batch (``--data.init_args.tokens_shape [h, w]``).

    python scripts/tokenize_shards.py --autoencoder runs/vqgan/checkpoints/last.ckpt \\
        --shards 'data/shards/{00000..00099}.tar' --out data/shards_tokens

Samples whose image does not decode are copied without tokens (the datamodule skips and counts
them). Each output shard has its input's name and appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datamodules.annotate import annotate_shard  # noqa: E402
from datamodules.shards import expand_urls  # noqa: E402
from datamodules.text_image import TOKENS_MEMBER  # noqa: E402
from lightning_modules.autoencoder import VQAutoencoder, load_autoencoder  # noqa: E402


def tokenize_shard(url: str, out_path: str, autoencoder, batch_size: int, max_pixels: int) -> tuple[int, int]:
    """Write ``out_path`` from shard ``url``; returns (samples with tokens, samples without)."""
    dtype = np.int16 if autoencoder.codebook_size <= np.iinfo(np.int16).max else np.int32

    def encode(x: torch.Tensor) -> np.ndarray:
        return autoencoder.encode(x.to(autoencoder.device))[1].cpu().numpy().astype(dtype)

    return annotate_shard(url, out_path, autoencoder.image_size, encode, TOKENS_MEMBER, batch_size, max_pixels)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", required=True, help="checkpoint of a trained VQ autoencoder")
    p.add_argument("--shards", required=True, help="input shards: brace range, directory or glob")
    p.add_argument("--out", required=True, help="output directory (one shard per input shard, same names)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-pixels", type=int, default=16_000_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    autoencoder = load_autoencoder(a.autoencoder, map_location=a.device, option="--autoencoder")
    if not isinstance(autoencoder, VQAutoencoder):
        raise SystemExit(
            f"error: --autoencoder {a.autoencoder!r} is a {type(autoencoder).__name__}; tokens need a VQ autoencoder"
        )
    urls = expand_urls(a.shards)
    os.makedirs(a.out, exist_ok=True)
    done = {"with_tokens": 0, "without": 0, "shards": 0}
    for url in urls:
        kept, missed = tokenize_shard(
            url, os.path.join(a.out, os.path.basename(url)), autoencoder, a.batch_size, a.max_pixels
        )
        done["with_tokens"] += kept
        done["without"] += missed
        done["shards"] += 1
    side = autoencoder.latent_shape[-1]
    print(f"{done['shards']} shards, {done['with_tokens']} samples with tokens, {done['without']} without; "
          f"train with --data.init_args.train_shards {a.out} --data.init_args.tokens_shape '[{side}, {side}]'")  # fmt: skip
    return done


if __name__ == "__main__":
    main()
