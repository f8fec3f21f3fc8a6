"""A text-conditional UNet denoiser: residual blocks with timestep scale-shift, self-attention
and cross-attention to the text tokens (with their padding mask) at chosen levels.

``UNet.forward(x (b, c, h, w), t (b,), text: TextEncoding, cond_image=None, aug_level=None)
-> (b, out_channels, h, w)``. ``cond_image`` (b, cond_channels, h, w) is concatenated to the
input (super-resolution stages); ``aug_level`` (b,) is the noise-augmentation timestep of
that image, embedded like ``t``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .checkpointing import checkpointed
from .text_encoders import TextEncoding


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (b,) timesteps -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding applied as scale and shift in between."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention from queries (b, n, d) to keys/values (b, m, d_ctx) with a mask (b, m)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (b, h, n, d)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


class AttentionBlock(nn.Module):
    """Self-attention over positions, then cross-attention to the text tokens.

    A learned null token is always attended to, so an empty (all-padding) caption is safe.
    """

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.self_attn = Attention(channels, channels, heads)
        self.cross_attn = Attention(channels, context_dim, heads)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))

    def forward(self, x: Tensor, text: TextEncoding) -> Tensor:
        b, c, h, w = x.shape
        seq = rearrange(x, "b c h w -> b (h w) c")
        y = self.norm1(seq)
        seq = seq + self.self_attn(y, y)
        context = torch.cat(
            [self.null.expand(b, -1, -1).to(text.tokens.dtype), text.tokens], dim=1
        )  # (b, 1 + n, d)
        mask = torch.cat([text.mask.new_ones(b, 1), text.mask], dim=1)
        seq = seq + self.cross_attn(self.norm2(seq), context, mask)
        return rearrange(seq, "b (h w) c -> b c h w", h=h, w=w)


class UNet(nn.Module):
    """Text-conditional UNet.

    Args:
        in_channels: image channels.
        out_channels: predicted channels.
        base_channels: channels of the first level.
        channel_mult: channel multiplier per level (one level per entry; all but the last downsample).
        num_res_blocks: residual blocks per level.
        attention_levels: indices of the levels with self- and cross-attention (the middle always has it).
        context_dim: width ``d`` of the text encoder's tokens and pooled vector.
        heads: attention heads.
        dropout: dropout inside residual blocks.
        cond_channels: channels of an image concatenated to the input (0: none).
        checkpointing: recompute each block's activations in the backward pass instead of keeping
            them (activation checkpointing: less memory, about a third more compute in training).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: list[int] = (1, 2),
        context_dim: int = 256,
        heads: int = 4,
        dropout: float = 0.0,
        cond_channels: int = 0,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.checkpointing = checkpointing
        emb_dim = 4 * base_channels
        self.base_channels, self.cond_channels, self.in_channels = base_channels, cond_channels, in_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.aug_embed = (
            nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if cond_channels
            else None
        )
        self.pooled_embed = nn.Linear(context_dim, emb_dim)
        self.input = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if level in attention_levels:
                    layers.append(AttentionBlock(ch, context_dim, heads))
                self.down.append(nn.ModuleList(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout),
                AttentionBlock(ch, context_dim, heads),
                ResBlock(ch, ch, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if level in attention_levels:
                    layers.append(AttentionBlock(ch, context_dim, heads))
                if level != 0 and i == num_res_blocks:
                    layers.append(
                        nn.Sequential(
                            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                        )
                    )
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor, text: TextEncoding) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, text)
            else:
                h = layer(h)
        return h

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: TextEncoding,
        cond_image: Tensor | None = None,
        aug_level: Tensor | None = None,
    ) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.base_channels)) + self.pooled_embed(
            text.pooled
        )  # (b, emb)
        if self.cond_channels:
            if cond_image is None:
                raise ValueError("this UNet is conditioned on an image (cond_channels > 0): pass cond_image")
            x = torch.cat([x, cond_image], dim=1)
            if aug_level is not None:
                emb = emb + self.aug_embed(timestep_embedding(aug_level, self.base_channels))
        h = self.input(x)
        hs = [h]
        on = self.checkpointing
        for layers in self.down:
            h = checkpointed(on, self, self._run, layers, h, emb, text)
            hs.append(h)
        h = checkpointed(on, self, self._run, self.middle, h, emb, text)
        for layers in self.up:
            h = checkpointed(on, self, self._run, layers, torch.cat([h, hs.pop()], dim=1), emb, text)
        return self.out(h)
