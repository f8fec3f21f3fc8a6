"""Contrastive losses of CLIP training, with negatives from the global batch under DDP.

- :func:`clip_loss`: the symmetric cross-entropy over the image-text similarity matrix scaled
  by ``exp(logit_scale)``; under DDP every rank gathers all features (keeping the gradient of
  its own, ``gather_with_grad``) and scores only its own rows against the whole batch (the local
  loss of open_clip's ``local_loss=True, gather_with_grad=True``), with labels offset by rank.
- :func:`siglip_loss`: the pairwise sigmoid loss (SigLIP), every pair its own binary problem,
  with a learnable bias; under DDP each rank scores its images against every rank's texts.

Both give, with several processes, the loss and gradients of one process on the concatenated
batch (``tests/test_clip_loss.py`` checks it on two gloo processes, and checks both against
open_clip's implementations).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps exp(logit_scale) at 100 after every step
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's start: temperature 0.07
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP's (and open_clip's for it) start, with bias -10


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and hands each
    rank the part of its own input (all ranks hold batches of the same size)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _distributed()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` (same size on every rank) concatenated along dim 0, in rank order; the
    gradient of the global loss flows back to each rank's own part."""
    if _distributed()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of l2-normalised ``(b, d)`` features; ``logit_scale`` is the log of the
    inverse temperature. Under DDP: this rank's ``b`` rows against the global batch."""
    rank, world = _distributed()
    all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    scale = logit_scale.exp()
    logits_per_image = scale * image_features @ all_texts.T  # (b, world * b)
    logits_per_text = scale * text_features @ all_images.T
    labels = (
        torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    )
    return 0.5 * (
        F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)
    )


def siglip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """SigLIP's sigmoid loss: ``-mean over images of sum over texts of log sigmoid(z_ij (s x_i.y_j
    + b))`` with ``z = +1`` on matching pairs and ``-1`` elsewhere, normalised by the local batch
    size (SigLIP's and open_clip's normalisation). Under DDP this rank's images meet every
    rank's texts."""
    rank, world = _distributed()
    all_texts = gather_with_grad(text_features)
    b = image_features.shape[0]
    logits = logit_scale.exp() * image_features @ all_texts.T + logit_bias  # (b, world * b)
    signs = -torch.ones_like(logits)
    signs[torch.arange(b), torch.arange(b) + rank * b] = 1.0
    return -F.logsigmoid(signs * logits.float()).sum() / b
