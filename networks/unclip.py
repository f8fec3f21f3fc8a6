"""The network of unCLIP's diffusion prior (DALL-E 2): text to a CLIP image embedding.

``DiffusionPrior`` is a causal transformer over one sequence, in this order: the caption's token
encodings, the CLIP text embedding, the timestep, the noised CLIP image embedding and a final
learned query. The output at the query is the predicted clean image embedding (x0; the paper
found predicting x0 better than eps here). Padding tokens of the caption are masked out as keys,
and every position sees only itself and the positions before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of integer timesteps ``t`` (b,): (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class CausalBlock(nn.Module):
    """Pre-norm self-attention under a causal and key-padding mask, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` (b, n, w); ``mask`` (b, 1, n, n) bool, True where a query may attend to a key."""
        b, n, w = x.shape
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class DiffusionPrior(nn.Module):
    """Predicts a clean CLIP image embedding from its noised version, the timestep and the caption.

    Args:
        embed_dim: CLIP's joint embedding size (image and text embeddings).
        token_dim: width of the caption's token encodings.
        width: transformer width.
        depth: transformer blocks.
        heads: attention heads.
        max_tokens: the longest caption encoding read (longer ones are cut).
    """

    def __init__(self, embed_dim: int, token_dim: int, width: int = 256, depth: int = 4, heads: int = 4,
                 max_tokens: int = 77):  # fmt: skip
        super().__init__()
        self.embed_dim, self.width, self.max_tokens = embed_dim, width, max_tokens
        self.tokens_in = nn.Linear(token_dim, width)
        self.text_in = nn.Linear(embed_dim, width)
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.image_in = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.positions = nn.Parameter(torch.randn(max_tokens + 4, width) * 0.02)
        self.blocks = nn.ModuleList([CausalBlock(width, heads) for _ in range(depth)])
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, embed_dim)

    def sequence(self, noised: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, text_embed: Tensor
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The input sequence (b, n + 4, width) and its attention mask (b, 1, n + 4, n + 4)."""
        tokens, token_mask = tokens[:, : self.max_tokens], token_mask[:, : self.max_tokens]
        b, n = token_mask.shape
        x = torch.cat([self.tokens_in(tokens), self.text_in(text_embed)[:, None],
                       self.time_in(timestep_features(t, self.width))[:, None], self.image_in(noised)[:, None],
                       self.query.expand(b, 1, -1)], dim=1)  # fmt: skip
        x = x + self.positions[: n + 4]
        keys = torch.cat([token_mask.bool(), token_mask.new_ones(b, 4, dtype=torch.bool)], dim=1)  # (b, n + 4)
        causal = torch.ones(n + 4, n + 4, dtype=torch.bool, device=x.device).tril()
        itself = torch.eye(n + 4, dtype=torch.bool, device=x.device)  # a row with no real key (an empty caption) stays defined
        return x, causal[None, None] & (keys[:, None, None, :] | itself[None, None])

    def hidden(self, noised: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, text_embed: Tensor) -> Tensor:
        """Every position's output (b, n + 4, width), for inspection; the query's is the last."""
        x, mask = self.sequence(noised, t, tokens, token_mask, text_embed)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, noised: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, text_embed: Tensor) -> Tensor:
        """The predicted clean image embedding (b, embed_dim)."""
        return self.out(self.hidden(noised, t, tokens, token_mask, text_embed)[:, -1])
