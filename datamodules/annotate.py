"""Add a member computed from each sample's image to a shard: pre-computed image tokens
(``scripts/tokenize_shards.py``) or CLIP image embeddings (``scripts/embed_shards.py``), so that
training reads them instead of running a frozen network on every batch.

Every sample keeps its members; the new one is computed on the centre crop at ``image_size``, as
the datamodule makes it. Samples whose image does not decode are copied without it (the
datamodule skips and counts them). The output shard appears only when complete.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable

import numpy as np
import torch

from .shards import IMAGE_EXTENSIONS, SampleError, SkipCounter, decode_image, iter_tar_groups
from .text_image import build_transform


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def annotate_shard(url: str, out_path: str, image_size: int, encode: Callable[[torch.Tensor], np.ndarray],
                   member: str, batch_size: int = 64, max_pixels: int = 16_000_000) -> tuple[int, int]:  # fmt: skip
    """Write ``out_path`` from shard ``url`` with ``{key}.{member}``: ``encode`` of the images
    (a batch (b, 3, s, s) in [-1, 1] -> an array with one row per image), saved with
    ``np.save(allow_pickle=False)``. Returns (samples with the member, samples without)."""
    transform = build_transform(image_size, "center", False)
    samples = list(iter_tar_groups(url, SkipCounter()))
    images: dict[int, torch.Tensor] = {}
    for i, (_, members) in enumerate(samples):
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            continue
        try:
            images[i] = transform(decode_image(members[ext], max_pixels, image_size))
        except SampleError:
            pass
    computed: dict[int, np.ndarray] = {}
    order = sorted(images)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            computed.update(zip(chunk, encode(torch.stack([images[i] for i in chunk]))))
    with tarfile.open(out_path + ".partial", "w") as tar:
        for i, (key, members) in enumerate(samples):
            for ext, data in members.items():
                if not ext.startswith("__") and ext != member:
                    _add(tar, f"{key}.{ext}", data)
            if i in computed:
                buf = io.BytesIO()
                np.save(buf, computed[i], allow_pickle=False)
                _add(tar, f"{key}.{member}", buf.getvalue())
    os.replace(out_path + ".partial", out_path)
    return len(computed), len(samples) - len(computed)
