"""The text-conditional VAE: its KL, free bits and annealing, captions that steer the image, seeds."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.cvae import ConditionalVAE
from networks.cvae import ConditionalVAENet, diagonal_gaussian_kl
from networks.errors import ConfigError
from networks.text_encoders import TransformerTextEncoder

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def _model(**kw):
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    net = ConditionalVAENet(image_size=16, text_dim=32, latent_dim=8, channels=16, hidden=64)
    return ConditionalVAE(net, text, **kw)


def _targets():
    colours = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, -1]])
    targets = -torch.ones(4, 3, 16, 16)
    targets[:, :, 4:12, 4:12] = colours[:, :, None, None]
    return targets


def test_kl_between_diagonal_gaussians_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(5, 7) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_q, (0.5 * lv_q).exp()),
        torch.distributions.Normal(mu_p, (0.5 * lv_p).exp()),
    )
    assert torch.allclose(diagonal_gaussian_kl(mu_q, lv_q, mu_p, lv_p), expected, atol=1e-5)


def test_loss_is_reconstruction_plus_beta_kl_per_pixel_with_free_bits_and_annealing():
    torch.manual_seed(0)
    batch = {"image": _targets(), "caption": CAPTIONS}
    noise = torch.randn(4, 8)
    model = _model(beta=0.5)
    out = model.losses(batch, noise)
    assert torch.isclose(out["loss"], out["rec_loss"] + 0.5 * out["kl"] / (3 * 16 * 16))
    free = _model(beta=0.5, free_bits=100.0)
    free.load_state_dict(model.state_dict())
    out = free.losses(batch, noise)  # every dimension under its free nats: a constant KL term
    assert torch.isclose(out["loss"], out["rec_loss"] + 0.5 * 100.0 * 8 / (3 * 16 * 16))
    annealed = _model(beta=0.5, kl_anneal_steps=100)
    assert annealed.beta_at(0) == 0 and annealed.beta_at(50) == 0.25 and annealed.beta_at(500) == 0.5


def test_val_loss_is_at_full_beta_whatever_the_annealing_step(monkeypatch):
    """The same weights score the same val/loss at step 0, 500 and 1,000 of a 1,000-step KL ramp
    (a trainer that monitors it would otherwise prefer checkpoints of the annealing phase);
    val/loss_annealed follows the ramp."""
    torch.manual_seed(0)
    model = _model(beta=0.5, kl_anneal_steps=1000)
    loader = DataLoader([{"image": _targets(), "caption": CAPTIONS}], batch_size=None)
    scores = []
    for step in (0, 500, 1000):
        monkeypatch.setattr(ConditionalVAE, "global_step", property(lambda self, s=step: s))
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        scores.append(trainer.validate(model, loader, verbose=False)[0])
    assert scores[0]["val/loss"] == scores[1]["val/loss"] == scores[2]["val/loss"]
    assert scores[0]["val/loss_annealed"] < scores[1]["val/loss_annealed"] < scores[2]["val/loss_annealed"]
    assert scores[2]["val/loss_annealed"] == pytest.approx(scores[2]["val/loss"], rel=1e-6)


def test_overfit_each_caption_generates_its_own_image():
    L.seed_everything(0)
    targets = _targets()
    batch = {"image": targets.repeat(4, 1, 1, 1), "caption": CAPTIONS * 4}
    model = _model(beta=0.1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(
        model, DataLoader([batch] * 300, batch_size=None))  # fmt: skip
    model.eval()
    for seed in (0, 1):
        images = model.generate(CAPTIONS, seed=seed)
        distances = torch.cdist(images.flatten(1), targets.flatten(1))
        assert torch.equal(distances.argmin(1), torch.arange(4)), distances


def test_generate_is_seeded_per_prompt_and_temperature_zero_is_the_prior_mean():
    torch.manual_seed(0)
    model = _model().eval()
    a = model.generate(CAPTIONS[:2], seed=[3, 4])
    assert torch.equal(a, model.generate(CAPTIONS[:2], seed=[3, 4]))
    assert torch.allclose(
        a[1:], model.generate(CAPTIONS[1:2], seed=[4]), atol=1e-5
    )  # its own prompt and seed
    assert not torch.allclose(a, model.generate(CAPTIONS[:2], seed=[5, 6]))
    cold = model.generate(CAPTIONS[:1], seed=1, temperature=0.0)
    assert torch.equal(cold, model.generate(CAPTIONS[:1], seed=2, temperature=0.0))
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(TypeError, match="temperature"):
        model.generate(CAPTIONS[:1], guidance_scale=2.0)


def test_a_mismatched_text_dimension_is_a_clear_error():
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    with pytest.raises(ConfigError, match="set the net's text_dim to 32"):
        ConditionalVAE(ConditionalVAENet(image_size=16, text_dim=64), text)
    with pytest.raises(ConfigError, match="power of two"):
        ConditionalVAENet(image_size=24)
