"""A text-conditional UNet denoiser: residual blocks with timestep scale-shift, self-attention
and cross-attention to the text tokens (with their padding mask) at chosen levels.

``UNet.forward(x (b, c, h, w), t (b,), text: TextEncoding, cond_image=None, aug_level=None,
boxes=None, box_embeds=None, box_mask=None) -> (b, out_channels, h, w)``. ``cond_image``
(b, cond_channels, h, w) is concatenated to the input (super-resolution stages); ``aug_level``
(b,) is the noise-augmentation timestep of that image, embedded like ``t``.

Layout conditioning (GLIGEN, Li et al. 2023), with ``layout`` set: each object's box (b, m, 4)
``(x0, y0, x1, y1)`` in [0, 1], Fourier-embedded, and its phrase's pooled text embedding
(b, m, d) become one grounding token (``GroundingTokens``); ``box_mask`` (b, m) marks the real
objects. ``tokens`` appends the grounding tokens to the caption's tokens in every
cross-attention; ``gated`` adds GLIGEN's gated self-attention over visual and grounding tokens
before each cross-attention, its tanh gates at 0, so that the weights of a layout-free model
loaded into it sample the same images until trained.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

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


LayoutMode = Literal["tokens", "gated"]


def fourier_boxes(boxes: Tensor, freqs: int) -> Tensor:
    """GLIGEN's Fourier features of boxes (b, m, 4) in [0, 1] -> (b, m, 4 * 2 * freqs):
    sines and cosines at frequencies 100 ** (i / freqs)."""
    bands = 100.0 ** (torch.arange(freqs, device=boxes.device, dtype=torch.float32) / freqs)
    angles = rearrange(boxes.float()[..., None] * bands, "b m four f -> b m (four f)")
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class GroundingTokens(nn.Module):
    """One grounding token per object from its phrase embedding and its Fourier-embedded box
    (GLIGEN's MLP): (b, m, d) and (b, m, 4) -> (b, m, d); padded objects give zeros."""

    def __init__(self, dim: int, freqs: int = 8):
        super().__init__()
        self.freqs = freqs
        self.mlp = nn.Sequential(
            nn.Linear(dim + 8 * freqs, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
            nn.Linear(2 * dim, dim),
        )  # fmt: skip

    def forward(self, boxes: Tensor, box_embeds: Tensor, box_mask: Tensor) -> Tensor:
        feats = torch.cat([box_embeds, fourier_boxes(boxes, self.freqs).to(box_embeds.dtype)], dim=-1)
        return self.mlp(feats) * box_mask[..., None].to(box_embeds.dtype)


class Grounding(NamedTuple):
    tokens: Tensor  # (b, m, d) one per object
    mask: Tensor  # (b, m) bool, True where an object is


class GatedSelfAttention(nn.Module):
    """GLIGEN's gated self-attention: the visual tokens attend to themselves and to the grounding
    tokens, then a feed-forward layer; each added through a tanh gate that starts at 0."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.proj = nn.Linear(context_dim, channels)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = Attention(channels, channels, heads)
        self.ff = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, seq: Tensor, grounding: Grounding) -> Tensor:
        n = seq.shape[1]
        y = self.norm1(torch.cat([seq, self.proj(grounding.tokens.to(seq.dtype))], dim=1))  # (b, n + m, c)
        mask = torch.cat([grounding.mask.new_ones(seq.shape[0], n), grounding.mask], dim=1)
        seq = seq + torch.tanh(self.attn_gate) * self.attn(y, y, mask)[:, :n]
        return seq + torch.tanh(self.ff_gate) * self.ff(self.norm2(seq))


class AttentionBlock(nn.Module):
    """Self-attention over positions, then cross-attention to the text tokens (and, with a layout,
    to the grounding tokens or through gated self-attention; see the module's docstring).

    A learned null token is always attended to, so an empty (all-padding) caption is safe.
    """

    def __init__(self, channels: int, context_dim: int, heads: int, layout: LayoutMode | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.self_attn = Attention(channels, channels, heads)
        self.cross_attn = Attention(channels, context_dim, heads)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.layout = layout
        if layout == "gated":  # only then: a layout-free block keeps its state_dict keys
            self.fuser = GatedSelfAttention(channels, context_dim, heads)

    def forward(self, x: Tensor, text: TextEncoding, grounding: Grounding | None = None) -> Tensor:
        b, c, h, w = x.shape
        seq = rearrange(x, "b c h w -> b (h w) c")
        y = self.norm1(seq)
        seq = seq + self.self_attn(y, y)
        if grounding is not None and self.layout == "gated":
            seq = self.fuser(seq, grounding)
        context = torch.cat(
            [self.null.expand(b, -1, -1).to(text.tokens.dtype), text.tokens], dim=1
        )  # (b, 1 + n, d)
        mask = torch.cat([text.mask.new_ones(b, 1), text.mask], dim=1)
        if grounding is not None and self.layout == "tokens":
            context = torch.cat([context, grounding.tokens.to(context.dtype)], dim=1)  # (b, 1 + n + m, d)
            mask = torch.cat([mask, grounding.mask], dim=1)
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
        layout: layout conditioning (see the module's docstring): ``tokens`` (grounding tokens
            appended to the cross-attention context) or ``gated`` (GLIGEN's gated self-attention);
            None (the default): none, and no layout parameters.
        box_freqs: Fourier frequencies per box coordinate of the grounding tokens.
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
        layout: LayoutMode | None = None,
        box_freqs: int = 8,
    ):
        super().__init__()
        if layout not in (None, "tokens", "gated"):
            raise ValueError(f"denoiser layout must be null, tokens or gated, got {layout!r}")
        self.checkpointing, self.layout = checkpointing, layout
        if layout is not None:
            self.grounding = GroundingTokens(context_dim, box_freqs)
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
                    layers.append(AttentionBlock(ch, context_dim, heads, layout))
                self.down.append(nn.ModuleList(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout),
                AttentionBlock(ch, context_dim, heads, layout),
                ResBlock(ch, ch, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if level in attention_levels:
                    layers.append(AttentionBlock(ch, context_dim, heads, layout))
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
    def _run(
        layers: nn.ModuleList, h: Tensor, emb: Tensor, text: TextEncoding, grounding: Grounding | None = None
    ) -> Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, text, grounding)
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
        boxes: Tensor | None = None,
        box_embeds: Tensor | None = None,
        box_mask: Tensor | None = None,
    ) -> Tensor:
        """``boxes`` (b, m, 4) in [0, 1], ``box_embeds`` (b, m, context_dim) and ``box_mask``
        (b, m) bool: the layout (a layout-conditioned UNet only; None: no layout)."""
        grounding = None
        if boxes is not None:
            if self.layout is None:
                raise ValueError("this UNet has no layout conditioning (layout: null): pass no boxes")
            grounding = Grounding(self.grounding(boxes, box_embeds, box_mask), box_mask.bool())
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
            h = checkpointed(on, self, self._run, layers, h, emb, text, grounding)
            hs.append(h)
        h = checkpointed(on, self, self._run, self.middle, h, emb, text, grounding)
        for layers in self.up:
            h = checkpointed(
                on, self, self._run, layers, torch.cat([h, hs.pop()], dim=1), emb, text, grounding
            )
        return self.out(h)
