"""Activation checkpointing: the same gradients, fewer activations kept for the backward pass."""

import copy

import pytest
import torch

from networks.checkpointing import saved_activation_bytes
from networks.text_encoders import TextEncoding
from networks.transformer import MaskedTokenTransformer, TokenTransformer
from networks.unet import UNet


def _text(b=2, n=5, d=32):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 3:] = False
    return TextEncoding(torch.randn(b, n, d, generator=g), mask, torch.randn(b, d, generator=g))


def _step(model, run):
    """Loss, the gradient of every parameter and the activation bytes kept, for one backward."""
    model.zero_grad()
    with saved_activation_bytes(model) as saved:
        loss = run(model).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved.bytes


CASES = {
    "unet": (lambda on: UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                             context_dim=32, heads=2, checkpointing=on),
             lambda m: m(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700]), _text())),
    "ar": (lambda on: TokenTransformer(64, 4, width=32, depth=3, heads=2, context_dim=32, checkpointing=on),
           lambda m: m(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)), text=_text())[0]),
    "maskgit": (lambda on: MaskedTokenTransformer(64, 4, width=32, depth=3, heads=2, context_dim=32, checkpointing=on),
                lambda m: m(torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0)), _text())),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(name):
    build, run = CASES[name]
    torch.manual_seed(0)
    plain = build(False).train()
    with torch.no_grad():  # a non-zero output layer, so every gradient is non-trivial
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    saving = build(True).train()
    saving.load_state_dict(copy.deepcopy(plain.state_dict()))
    loss_a, grads_a, kept_a = _step(plain, run)
    loss_b, grads_b, kept_b = _step(saving, run)
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-6, rtol=1e-5), k
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)
    with torch.no_grad():  # evaluation and sampling run plainly
        assert torch.allclose(run(plain.eval()), run(saving.eval()), atol=1e-6)
