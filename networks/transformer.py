"""Transformers over image tokens: the autoregressive prior (DALL-E, Taming, Parti) with a KV
cache, the bidirectional MaskGIT prior, and the sampling pieces they share (temperature, top-k,
top-p, seeded draws, the MaskGIT schedule).

Conditioning on the text, in one of two ways:

- ``stream`` (DALL-E): the caption's token ids come first in the same sequence as the image
  tokens, with an embedding and an output head of their own;
- ``cross`` (Parti, Taming, Muse): every block cross-attends to the token embeddings of the
  injected text encoder, and the sequence starts with a learned start vector.

Sequence layout of the autoregressive prior: ``P`` prefix slots (the caption's ``L`` ids, or one
start slot), then the image tokens ``0 .. n-2``. Slot ``P - 1 + k`` predicts image token ``k``
and carries the position embedding of token ``k``, so a slot knows where it writes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpointing import checkpointed
from .noise import Generators, rand


# ---------------------------------------------------------------------------------- blocks
class KVCache:
    """Keys and values of one self-attention layer for slots ``[0, length)``, preallocated for
    ``slots`` slots on the first append (in the dtype the layer computes in, e.g. under autocast)."""

    def __init__(self, slots: int):
        self.slots, self.length = slots, 0
        self.k = self.v = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.slots, d)
            self.v = torch.empty_like(self.k)
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, else cross-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:  # (b, n, d) -> (b, heads, n, d / heads)
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``x`` (b, m, d). Self-attention over ``x`` (and the slots before it in ``cache``), causal
        if asked; cross-attention over ``context`` (b, c, d_c) with key ``mask`` (b, c), or over
        precomputed ``kv``."""
        b, m, d = x.shape
        q = self.split(self.q(x))
        attn_mask = None
        if context is not None or kv is not None:
            k, v = kv if kv is not None else self.keys_values(context)
            if mask is not None:
                attn_mask = mask[:, None, None, :]
        else:
            k, v = self.keys_values(x)
            start = 0
            if cache is not None:
                start = cache.length
                k, v = cache.append(k, v)
            if causal and m > 1:  # query slot start + i sees key slots 0 .. start + i
                rows = torch.arange(start, start + m, device=x.device)[:, None]
                attn_mask = rows >= torch.arange(start + m, device=x.device)[None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.cross = None
        if context_dim is not None:
            self.norm_cross, self.cross = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, causal: bool, context=None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, cache=cache)
        if self.cross is not None:
            tokens, mask, kv = context
            x = x + self.cross(self.norm_cross(x), tokens, mask, kv=kv)
        return x + self.mlp(self.norm2(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class ImagePositions(nn.Module):
    """Learned positions of an ``side x side`` token grid: one table (``1d``) or row + column (``2d``)."""

    def __init__(self, side: int, dim: int, kind: Literal["1d", "2d"] = "2d"):
        super().__init__()
        self.side, self.kind = side, kind
        if kind == "1d":
            self.table = nn.Parameter(torch.randn(side * side, dim) * 0.02)
        elif kind == "2d":
            self.rows = nn.Parameter(torch.randn(side, 1, dim) * 0.02)
            self.cols = nn.Parameter(torch.randn(1, side, dim) * 0.02)
        else:
            raise ValueError(f"positions must be '1d' or '2d', got {kind!r}")

    def forward(self) -> Tensor:  # (side * side, dim), raster order
        return self.table if self.kind == "1d" else (self.rows + self.cols).flatten(0, 1)


# ---------------------------------------------------------------------------------- AR prior
class TokenTransformer(nn.Module):
    """Decoder-only transformer over a caption prefix and raster-order image tokens.

    Args:
        vocab_size: image codes (the autoencoder's codebook size).
        side: the token grid's side (image side / downsampling factor).
        width, depth, heads: transformer size.
        conditioning: ``stream`` (caption ids in the sequence) or ``cross`` (cross-attention).
        text_vocab_size, text_length: the caption tokenizer's vocabulary and the caption slots
            (``stream`` only).
        context_dim: width of the text encoder's token embeddings (``cross`` only).
        positions: ``2d`` (row + column) or ``1d`` learned image positions.
        checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (activation checkpointing; sampling is unaffected).
    """

    def __init__(
        self,
        vocab_size: int,
        side: int,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        conditioning: Literal["stream", "cross"] = "cross",
        text_vocab_size: int = 259,
        text_length: int = 24,
        context_dim: int = 256,
        positions: Literal["1d", "2d"] = "2d",
        checkpointing: bool = False,
    ):
        super().__init__()
        self.checkpointing = checkpointing
        if conditioning not in ("stream", "cross"):
            raise ValueError(f"conditioning must be 'stream' or 'cross', got {conditioning!r}")
        self.vocab_size, self.side, self.num_tokens = vocab_size, side, side * side
        self.width, self.conditioning = width, conditioning
        self.image_embed = nn.Embedding(vocab_size, width)
        self.image_pos = ImagePositions(side, width, positions)
        if conditioning == "stream":
            self.text_length, self.text_vocab_size = text_length, text_vocab_size
            self.text_embed = nn.Embedding(text_vocab_size, width)
            self.text_pos = nn.Parameter(torch.randn(text_length, width) * 0.02)
            self.text_head = nn.Linear(width, text_vocab_size, bias=False)
            self.prefix_length = text_length
        else:
            self.start = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.prefix_length = 1
        cross_dim = context_dim if conditioning == "cross" else None
        self.blocks = nn.ModuleList(Block(width, heads, cross_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(_init)

    @property
    def slots(self) -> int:
        return self.prefix_length + self.num_tokens - 1

    def embed_prefix(self, batch: int, text_ids: Tensor | None) -> Tensor:
        if self.conditioning == "stream":
            h = self.text_embed(text_ids) + self.text_pos
        else:
            h = self.start.expand(batch, 1, self.width)
        last = h[:, -1:] + self.image_pos()[:1]  # the last prefix slot predicts token 0
        return torch.cat([h[:, :-1], last], dim=1)

    def embed_tokens(self, tokens: Tensor, first: int) -> Tensor:
        """Slots holding image tokens ``first .. first + m - 1`` (they predict ``first + 1 ..``)."""
        pos = self.image_pos()[first + 1 : first + 1 + tokens.shape[1]]
        return self.image_embed(tokens) + pos

    def context(self, text) -> tuple | None:
        """The cross-attention input from a ``TextEncoding`` (None for ``stream``)."""
        if self.conditioning == "stream":
            return None
        return (text.tokens, text.mask, None)

    def cached_context(self, text) -> list | None:
        """Per block, the text's cross-attention keys and values, computed once for sampling."""
        if self.conditioning == "stream":
            return None
        return [(None, text.mask, blk.cross.keys_values(text.tokens)) for blk in self.blocks]

    def run(self, h: Tensor, context=None, caches: list[KVCache] | None = None) -> Tensor:
        for i, blk in enumerate(self.blocks):
            ctx = context[i] if isinstance(context, list) else context
            cache = None if caches is None else caches[i]
            h = checkpointed(self.checkpointing and cache is None, self, blk, h, causal=True, context=ctx, cache=cache)
        return self.norm(h)

    def forward(
        self, tokens: Tensor, text_ids: Tensor | None = None, text=None
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced logits: image logits (b, n, vocab) for every image token, and caption
        logits (b, L - 1, text vocab) for caption ids ``1 .. L-1`` (``stream``; else None)."""
        b = tokens.shape[0]
        h = torch.cat([self.embed_prefix(b, text_ids), self.embed_tokens(tokens[:, :-1], 0)], dim=1)
        h = self.run(h, self.context(text))
        p = self.prefix_length
        text_logits = self.text_head(h[:, : p - 1]) if self.conditioning == "stream" else None
        return self.head(h[:, p - 1 :]), text_logits

    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.slots) for _ in self.blocks]


# ---------------------------------------------------------------------------------- MaskGIT
class MaskedTokenTransformer(nn.Module):
    """Bidirectional transformer over image tokens (MaskGIT, Muse): index ``vocab_size`` is the
    mask token; logits over the ``vocab_size`` codes at every position; cross-attention to text.

    Args: as :class:`TokenTransformer` (``cross`` conditioning only).
    """

    def __init__(
        self,
        vocab_size: int,
        side: int,
        width: int = 256,
        depth: int = 6,
        heads: int = 8,
        context_dim: int = 256,
        positions: Literal["1d", "2d"] = "2d",
        checkpointing: bool = False,
    ):
        super().__init__()
        self.checkpointing = checkpointing
        self.vocab_size, self.side, self.num_tokens, self.width = vocab_size, side, side * side, width
        self.mask_id = vocab_size
        self.embed = nn.Embedding(vocab_size + 1, width)
        self.pos = ImagePositions(side, width, positions)
        self.blocks = nn.ModuleList(Block(width, heads, context_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(_init)

    def forward(self, tokens: Tensor, text) -> Tensor:
        """``tokens`` (b, n) with ``mask_id`` where masked -> logits (b, n, vocab_size)."""
        h = self.embed(tokens) + self.pos()
        for blk in self.blocks:
            h = checkpointed(self.checkpointing, self, blk, h, causal=False, context=(text.tokens, text.mask, None))
        return self.head(self.norm(h))


# ---------------------------------------------------------------------------------- sampling
def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``-inf`` outside the ``top_k`` largest logits and outside the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus); the most likely token always stays."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # already reached top_p without it
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: Tensor, generator: Generators, temperature: float = 1.0) -> Tensor:
    """One token per row of ``logits`` (b, ..., v), drawn with one uniform per token from
    ``generator`` (inverse CDF, so each sample's draw depends only on its own generator);
    ``temperature`` 0 is the argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    u = rand(probs.shape[:-1], generator, device=probs.device)[..., None]
    cdf = probs.cumsum(-1)
    index = (cdf < u * cdf[..., -1:]).sum(-1)
    return index.clamp_max(probs.shape[-1] - 1)


def guided_logits(logits: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance on a doubled batch (conditional half first): ``u + s (c - u)``;
    at scale 1 the conditional logits themselves."""
    c, u = logits.float().chunk(2)
    return c if guidance_scale == 1.0 else u + guidance_scale * (c - u)


@torch.no_grad()
def sample_autoregressive(
    net: TokenTransformer,
    text_ids: Tensor | None,
    text,
    generator: Generators,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    use_cache: bool = True,
) -> Tensor:
    """(b, n) image tokens from ``net``, one at a time, with temperature, top-k, top-p and
    classifier-free guidance. With guidance the text inputs (caption ids ``text_ids`` or the text
    encoding ``text``) hold the prompts then as many empty captions, and both halves are fed the
    same sampled token (Parti, LlamaGen). With ``use_cache`` each new token runs one slot through
    the network (KV cache); without, the whole sequence again (taming-transformers' sampler)."""
    rows = (text_ids if text_ids is not None else text.tokens).shape[0]
    guide = guidance_scale != 1.0
    b = rows // 2 if guide else rows
    prefix = net.embed_prefix(rows, text_ids)
    tokens = prefix.new_zeros(rows, 0, dtype=torch.long)
    if use_cache:
        caches = net.new_caches()
        context = net.cached_context(text)
        h = net.run(prefix, context, caches)
    else:
        context = net.context(text)
    for k in range(net.num_tokens):
        if not use_cache:
            h = net.run(torch.cat([prefix, net.embed_tokens(tokens, 0)], dim=1), context)
        elif k > 0:
            h = net.run(net.embed_tokens(tokens[:, -1:], k - 1), context, caches)
        logits = net.head(h[:, -1]).float()
        if guide:
            logits = guided_logits(logits, guidance_scale)
        token = sample_from_logits(filter_logits(logits, top_k, top_p), generator, temperature)
        fed = torch.cat([token, token]) if guide else token  # both halves get the same token
        tokens = torch.cat([tokens, fed[:, None]], dim=1)
    return tokens[:b]


def gumbel(shape, generator: Generators, device) -> Tensor:
    u = rand(shape, generator, device=device).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def mask_ratio(r: Tensor | float) -> Tensor | float:
    """MaskGIT's cosine schedule: the fraction of tokens masked at progress ``r`` in [0, 1]."""
    if isinstance(r, Tensor):
        return torch.cos(r * math.pi / 2)
    return math.cos(r * math.pi / 2)


def choice_noise(step: int, steps: int, choice_temperature: float) -> float:
    """The scale of the Gumbel noise on MaskGIT's confidences at decoding ``step`` (0-based):
    ``choice_temperature * (1 - (step + 1) / steps)``, annealed from near ``choice_temperature``
    at the first step to 0 at the last (MaskGIT's ``mask_by_random_topk``)."""
    return choice_temperature * (1.0 - (step + 1) / steps)


def masked_per_step(num_tokens: int, steps: int) -> list[int]:
    """How many tokens are still masked after each of ``steps`` decoding steps (the last is 0)."""
    return [max(0, math.floor(mask_ratio((s + 1) / steps) * num_tokens)) for s in range(steps)]
