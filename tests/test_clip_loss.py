"""CLIP's contrastive losses: a hand-computed cross-entropy, open_clip's ClipLoss and SigLipLoss,
and global-batch negatives on two gloo processes equal to one process on the whole batch."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from ddp_clip_loss_script import batch, step
from open_clip.loss import ClipLoss, SigLipLoss

from networks.clip_loss import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clip_loss, siglip_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_clip_loss_is_the_symmetric_cross_entropy_of_the_scaled_similarities():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(math.log(10.0))
    s = 10 * image @ text.T  # [[8, 0], [4.8, 8]]
    by_hand = 0.0
    for logits in (s, s.T):
        for i in range(2):
            by_hand += -(logits[i, i] - torch.logsumexp(logits[i], 0)) / 4
    assert torch.isclose(clip_loss(image, text, scale), by_hand)
    assert math.isclose(math.exp(INIT_LOGIT_SCALE), 1 / 0.07) and math.isclose(
        math.exp(MAX_LOGIT_SCALE), 100.0
    )


def test_losses_equal_open_clips():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale, bias = torch.tensor(2.3), torch.tensor(-7.0)
    assert torch.isclose(clip_loss(image, text, scale), ClipLoss()(image, text, scale.exp()))
    assert torch.isclose(siglip_loss(image, text, scale, bias), SigLipLoss()(image, text, scale.exp(), bias))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_processes_with_global_negatives_equal_one_process_on_the_whole_batch(kind, tmp_path):
    out = str(tmp_path / "ddp.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_clip_loss_script.py"), out, kind],
                   env=env, check=True, timeout=120)  # fmt: skip
    ddp = torch.load(out)
    images, texts = batch()
    loss, grads = step(images, texts, kind)
    assert torch.allclose(ddp["loss"], loss, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, atol=1e-6), name
    # without the gathered negatives each half sees only its own 3 pairs: a different loss
    half, _ = step(images[:3], texts[:3], kind)
    assert not torch.isclose(half, loss)
