"""The EMA formula and its warm-up, pinned with exact numbers."""

import pytest
import torch
from torch import nn

from lightning_modules.ema import ema_decay, ema_update


def test_ema_update_moves_a_fraction_one_minus_decay_towards_the_live_weights():
    ema, live = nn.Linear(3, 2), nn.Linear(3, 2)
    ema.register_buffer("count", torch.zeros(1))
    live.register_buffer("count", torch.full((1,), 5.0))
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in live.parameters():
            p.fill_(11.0)
    ema_update(ema, live, 0.9)
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 2.0))  # 0.9 * 1 + 0.1 * 11
    assert ema.count.item() == 5.0  # buffers (batch-norm statistics) are copied


def test_ema_decay_warms_up_then_holds_the_configured_decay():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0): follows the early weights
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.5, 100) == 0.5 and ema_decay(0.5, 3) == pytest.approx(4 / 13)
