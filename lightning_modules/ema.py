"""Exponential moving averages of networks (the weights that sample)."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(decay: float, step: int) -> float:
    """``decay`` with a warm-up, so an early EMA follows the weights instead of their random start."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * live`` for parameters; buffers (batch-norm
    statistics) are copied, so an EMA network in eval mode normalises like the live one.

    Sharded networks (``FullyShardedStrategy``) are first resharded: FSDP leaves a root module's
    own parameters gathered after a forward pass with no backward (the EMA's, when it samples), and
    the update is on each rank's shards."""
    for network in (ema, live):
        if callable(getattr(network, "reshard", None)):
            network.reshard()
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), live.buffers()):
        b_ema.copy_(b)
