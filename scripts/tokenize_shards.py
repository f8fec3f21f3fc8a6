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
import io
import os
import sys
import tarfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datamodules.shards import (  # noqa: E402
    IMAGE_EXTENSIONS,
    SampleError,
    SkipCounter,
    decode_image,
    expand_urls,
    iter_tar_groups,
)
from datamodules.text_image import TOKENS_MEMBER, build_transform  # noqa: E402
from lightning_modules.autoencoder import VQAutoencoder, load_autoencoder  # noqa: E402


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def tokenize_shard(url: str, out_path: str, autoencoder, batch_size: int, max_pixels: int) -> tuple[int, int]:
    """Write ``out_path`` from shard ``url``; returns (samples with tokens, samples without)."""
    transform = build_transform(autoencoder.image_size, "center", False)
    samples = list(iter_tar_groups(url, SkipCounter()))
    images: dict[int, torch.Tensor] = {}
    for i, (_, members) in enumerate(samples):
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            continue
        try:
            images[i] = transform(decode_image(members[ext], max_pixels, autoencoder.image_size))
        except SampleError:
            pass
    tokens: dict[int, np.ndarray] = {}
    order = sorted(images)
    dtype = np.int16 if autoencoder.codebook_size <= np.iinfo(np.int16).max else np.int32
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            x = torch.stack([images[i] for i in chunk]).to(autoencoder.device)
            codes = autoencoder.encode(x)[1].cpu().numpy().astype(dtype)
            tokens.update(zip(chunk, codes))
    with tarfile.open(out_path + ".partial", "w") as tar:
        for i, (key, members) in enumerate(samples):
            for ext, data in members.items():
                if not ext.startswith("__"):
                    _add(tar, f"{key}.{ext}", data)
            if i in tokens:
                buf = io.BytesIO()
                np.save(buf, tokens[i], allow_pickle=False)
                _add(tar, f"{key}.{TOKENS_MEMBER}", buf.getvalue())
    os.replace(out_path + ".partial", out_path)
    return len(tokens), len(samples) - len(tokens)


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
