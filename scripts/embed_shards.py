"""Pre-compute CLIP image embeddings into shards for unCLIP: every sample keeps its members and
gains ``{key}.clip.npy``, the unit image embedding (float16) of a trained CLIP, of the centre crop
at ``--image-size`` (the data's, as the datamodule makes it). The prior and the decoder then read
the embeddings instead of running CLIP's image tower on every batch
(``--data.init_args.clip_embed_dim <d>``). The text side is not stored: the prior reads the
caption's token encodings from CLIP's text tower anyway, which gives the text embedding with them.

    python scripts/embed_shards.py --clip runs/clip/checkpoints/last.ckpt \\
        --shards 'data/shards/{00000..00099}.tar' --out data/shards_clip --image-size 32

Samples whose image does not decode are copied without an embedding (the datamodule skips and
counts them). Each output shard has its input's name and appears only when complete.
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
from datamodules.text_image import CLIP_MEMBER  # noqa: E402
from lightning_modules.clip import load_clip  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="checkpoint of a trained CLIP (configs/clip/)")
    p.add_argument("--shards", required=True, help="input shards: brace range, directory or glob")
    p.add_argument("--out", required=True, help="output directory (one shard per input shard, same names)")
    p.add_argument("--image-size", type=int, help="the data's image size (default: the CLIP image tower's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-pixels", type=int, default=16_000_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        clip = load_clip(a.clip, map_location=a.device, option="--clip")
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    size = a.image_size or clip.image_size
    if not size:
        raise SystemExit("error: the CLIP's image tower states no image size: give --image-size (the data's)")
    urls = expand_urls(a.shards)
    if not urls:
        raise SystemExit(f"error: --shards {a.shards!r} matches no shard")

    def encode(x: torch.Tensor) -> np.ndarray:
        return clip.encode_image(x.to(a.device)).cpu().numpy().astype(np.float16)

    os.makedirs(a.out, exist_ok=True)
    done = {"with_embedding": 0, "without": 0, "shards": 0}
    for url in urls:
        kept, missed = annotate_shard(url, os.path.join(a.out, os.path.basename(url)), size, encode, CLIP_MEMBER,
                                      a.batch_size, a.max_pixels)  # fmt: skip
        done["with_embedding"] += kept
        done["without"] += missed
        done["shards"] += 1
    dim = clip.encode_text([""]).shape[-1]
    print(f"{done['shards']} shards, {done['with_embedding']} samples with an embedding, {done['without']} without; "
          f"train with --data.init_args.train_shards {a.out} --data.init_args.clip_embed_dim {dim}")  # fmt: skip
    return done


if __name__ == "__main__":
    main()
