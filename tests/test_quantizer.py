"""Vector quantizer: straight-through gradients, the loss and where beta goes, EMA codes,
dead-code restart (also across two gloo ranks), usage and perplexity."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from networks.errors import ConfigError
from networks.quantizer import VectorQuantizer, perplexity, usage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_straight_through_gradient_reaches_the_encoder_unchanged(cosine, codebook_dim):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, dim=8, codebook_dim=codebook_dim, cosine=cosine, ema=False)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 8, 3, 3)
    (vq(z).latents * upstream).sum().backward()
    # the decoder's gradient passes the lookup as if it were the identity (through the projections)
    z2 = z.detach().clone().requires_grad_(True)
    flat = vq._flat_inputs(z2)
    identity = vq.project_out(flat).view(2, 3, 3, 8).permute(0, 3, 1, 2)
    (identity * upstream).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert z.grad.abs().sum() > 0


def test_loss_is_codebook_term_plus_beta_times_commitment_and_beta_weights_the_encoder_side():
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(6, dim=4, beta=beta, ema=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    q = vq.codebook[out.indices.flatten()]
    flat = _flat(z)
    assert torch.allclose(out.loss, (1 + beta) * F.mse_loss(flat, q), atol=1e-6)
    assert torch.allclose(out.commit_loss, F.mse_loss(flat, q), atol=1e-6)
    out.loss.backward()
    n = flat.numel()
    # encoder side: beta * d||z - sg[e]||^2 / dz; codebook side: d||sg[z] - e||^2 / de, unweighted
    expected_z = (beta * 2 * (flat - q) / n).detach().view(2, 3, 3, 4).permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, expected_z, atol=1e-7)
    expected_codes = torch.zeros_like(vq.codebook).index_add_(
        0, out.indices.flatten(), (2 * (q - flat) / n).detach()
    )
    assert torch.allclose(vq.codebook.grad, expected_codes, atol=1e-7)


def test_with_ema_codes_the_loss_is_the_weighted_commitment_alone():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, dim=4, beta=0.4, ema=True).eval()
    z = torch.randn(2, 4, 3, 3)
    out = vq(z)
    q = vq.codebook[out.indices.flatten()]
    assert torch.allclose(out.loss, 0.4 * F.mse_loss(_flat(z), q), atol=1e-6)


def test_an_ema_update_moves_the_codes_to_the_means_of_their_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, dim=3, ema=True, decay=0.0, eps=1e-8).train()
    z = torch.randn(4, 3, 4, 4)
    before = vq.codebook.clone()
    indices = vq.nearest(_flat(z))
    vq(z)
    flat = _flat(z)
    for k in indices.unique():
        assert torch.allclose(vq.codebook[k], flat[indices == k].mean(0), atol=1e-5)
    # with decay, one step goes part of the way: the EMA of sums over the EMA of smoothed counts
    vq2 = VectorQuantizer(8, dim=3, ema=True, decay=0.9, eps=1e-5).train()
    vq2.codebook.copy_(before), vq2.ema_sum.copy_(before)
    counts = torch.bincount(indices, minlength=8).float()
    sums = torch.zeros(8, 3).index_add_(0, indices, flat)
    ema_count = 0.9 * torch.ones(8) + 0.1 * counts
    ema_sum = 0.9 * before + 0.1 * sums
    n = ema_count.sum()
    expected = ema_sum / ((ema_count + 1e-5) / (n + 8 * 1e-5) * n)[:, None]
    vq2(z)
    assert torch.allclose(vq2.codebook, expected, atol=1e-6)


def test_ema_counts_are_laplace_smoothed_so_an_unused_code_stays_finite():
    """Sonnet's / vector-quantize-pytorch's smoothing: (count + eps) / (n + K eps) * n. A code no
    vector chose has a zero count and a zero sum: it stays at 0, not 0 / 0."""
    vq = VectorQuantizer(4, dim=2, ema=True, decay=0.0, eps=0.5).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [9.0, 9.0], [-9.0, 9.0], [9.0, -9.0]]))
    z = torch.tensor([[0.1, 0.2], [0.3, -0.1], [-0.2, 0.1]]).T.reshape(1, 2, 3, 1)  # all nearest to code 0
    vq(z)
    counts = torch.tensor([3.0, 0.0, 0.0, 0.0])
    smoothed = (counts + 0.5) / (3 + 4 * 0.5) * 3
    expected = torch.zeros(4, 2)
    expected[0] = torch.tensor([0.2, 0.2]) / smoothed[0]  # the sum of the three vectors
    assert torch.isfinite(vq.codebook).all()
    assert torch.allclose(vq.codebook, expected, atol=1e-6)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_are_restarted_from_encoder_outputs(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, dim=3, ema=ema, dead_code_threshold=0.5).train()
    vq.ema_count.copy_(torch.tensor([5.0, 5, 5, 5, 0.0, 0.0, 5, 5]))  # codes 4 and 5 unused lately
    z = torch.randn(2, 3, 4, 4) + 10  # far from every code: the batch would pick one code at most
    flat = _flat(z)
    assigned = vq.codebook.detach()[vq.nearest(flat)].clone()
    out = vq(z)
    # this batch is decoded from the codes it was assigned, not from codes moved or restarted after
    assert torch.allclose(_flat(out.latents), assigned, atol=1e-6)
    for k in (4, 5):
        assert (vq.codebook[k] - flat).abs().sum(1).min() < 1e-5, (
            "a restarted code is one of the batch's vectors"
        )
        assert vq.ema_count[k] == 0.5
    used = torch.bincount(vq.nearest(flat), minlength=8)
    assert (used[[4, 5]] > 0).any()  # the restarted codes now take vectors
    nothing = VectorQuantizer(8, dim=3, ema=ema, dead_code_threshold=0.0).train()
    nothing.ema_count.copy_(torch.tensor([5.0, 5, 5, 5, 0.0, 0.0, 5, 5]))
    kept = nothing.codebook[4:6].clone()
    nothing(z)
    assert torch.equal(nothing.codebook[4:6], kept) or ema  # EMA decays unused codes towards 0, never to z


def test_codebook_stays_identical_across_two_gloo_ranks_with_different_batches(tmp_path):
    out = tmp_path / "ranks.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_quantizer_script.py"), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    a, b = ranks["0"], ranks["1"]
    assert a["inputs"] != b["inputs"]  # the ranks saw different vectors
    assert a["restarted"] == b["restarted"] > 0
    assert a["codebook"] == b["codebook"] and a["ema_count"] == b["ema_count"]
    # every restarted code came from rank zero's batch
    rank0 = torch.tensor(a["flat"])
    for code in torch.tensor(a["codebook"])[a["dead"]]:
        assert (rank0 - code).abs().sum(1).min() < 1e-5


def test_usage_and_perplexity_of_a_hand_made_assignment():
    counts = torch.bincount(torch.tensor([0, 0, 1, 1]), minlength=4)
    assert usage(counts) == 0.5
    assert torch.isclose(perplexity(counts), torch.tensor(2.0))
    assert torch.isclose(perplexity(torch.tensor([3, 3, 3, 3])), torch.tensor(4.0))
    assert torch.isclose(perplexity(torch.tensor([8, 0, 0, 0])), torch.tensor(1.0))
    skewed = perplexity(torch.tensor([6, 1, 1, 0]))
    assert 1.0 < skewed < 3.0


def test_lookup_of_indices_is_what_forward_gives_the_decoder():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, dim=8, codebook_dim=4, cosine=True).eval()
    out = vq(torch.randn(2, 8, 4, 4))
    assert torch.allclose(vq.lookup(out.indices), out.latents, atol=1e-6)


def test_codebook_dim_larger_than_the_latent_is_a_clear_error():
    with pytest.raises(ConfigError, match="codebook_dim 64 is larger than the latent dimension 32"):
        VectorQuantizer(16, dim=32, codebook_dim=64)
