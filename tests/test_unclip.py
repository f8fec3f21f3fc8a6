"""unCLIP's diffusion prior network: the order it reads, its causal and padding masks."""

import torch

from networks.unclip import DiffusionPrior


def _inputs(b=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:] = False  # the second caption has three real tokens
    return (torch.randn(b, 8, generator=g), torch.tensor([10, 900]), torch.randn(b, n, 12, generator=g), mask,
            torch.randn(b, 8, generator=g))  # fmt: skip


def _prior():
    torch.manual_seed(0)
    return DiffusionPrior(embed_dim=8, token_dim=12, width=32, depth=2, heads=4, max_tokens=16).eval()


def test_the_causal_mask_keeps_each_position_from_seeing_later_ones():
    """The noised image embedding sits after the tokens, the text embedding and the timestep:
    changing it changes the query's output and nothing before it."""
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    with torch.no_grad():
        a = prior.hidden(noised, t, tokens, mask, text)
        b = prior.hidden(noised + 1.0, t, tokens, mask, text)
    n = tokens.shape[1]
    assert torch.allclose(a[:, : n + 2], b[:, : n + 2])  # tokens, text embedding, timestep: unchanged
    assert not torch.allclose(a[:, n + 2 :], b[:, n + 2 :])  # the noised embedding and the query see it


def test_padding_tokens_are_not_read_and_an_empty_caption_stays_finite():
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    changed = tokens.clone()
    changed[1, 3:] += 5.0  # the second caption's padding
    with torch.no_grad():
        a, b = prior(noised, t, tokens, mask, text), prior(noised, t, changed, mask, text)
        assert torch.allclose(a, b, atol=1e-6)
        empty = prior(noised, t, tokens, torch.zeros_like(mask), text)
    assert torch.isfinite(empty).all() and empty.shape == (2, 8)


def test_the_prediction_depends_on_timestep_text_and_tokens():
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    with torch.no_grad():
        base = prior(noised, t, tokens, mask, text)
        for other in (prior(noised, t.flip(0), tokens, mask, text), prior(noised, t, tokens, mask, -text),
                      prior(noised, t, tokens * 0, mask, text)):  # fmt: skip
            assert not torch.allclose(base, other)
