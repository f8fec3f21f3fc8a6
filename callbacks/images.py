"""Turning generated batches into captioned grids and files."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil(image: Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image."""
    arr = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def captioned_grid(images: Tensor, captions: list[str], columns: int = 4, min_tile: int = 128) -> Image.Image:
    """A grid of images (b, 3, h, w) in [-1, 1], each with its caption written under it."""
    font = ImageFont.load_default()
    tiles = []
    for img, cap in zip(images, captions):
        pil = to_pil(img)
        if pil.width < min_tile:  # small images are enlarged so that they can be seen
            pil = pil.resize((min_tile, min_tile * pil.height // pil.width), Image.NEAREST)
        lines = textwrap.wrap(cap, width=max(pil.width // 7, 8))[:4]
        tile = Image.new("RGB", (pil.width, pil.height + 12 * 4 + 4), (255, 255, 255))
        tile.paste(pil, (0, 0))
        draw = ImageDraw.Draw(tile)
        for i, line in enumerate(lines):
            draw.text((2, pil.height + 2 + 12 * i), line, fill=(0, 0, 0), font=font)
        tiles.append(np.asarray(tile))
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    th, tw, _ = tiles[0].shape
    canvas = np.full((rows * th, columns * tw, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = t
    return Image.fromarray(canvas)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "prompt"
