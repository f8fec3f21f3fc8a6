"""Autoencoders: the networks' shapes, the adaptive weight, training that lowers the
reconstruction loss, the discriminator switched on at disc_start, checkpoints, frozen loading,
the perceptual loss read from a local file, and clear errors for settings that cannot work."""

import os

import lightning as L
import lpips
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.autoencoder import (
    KLAutoencoder,
    VQAutoencoder,
    adaptive_weight,
    load_autoencoder,
    psnr,
)
from networks.autoencoder import Decoder, Encoder
from networks.errors import ConfigError, MissingFileError
from networks.patchgan import PatchDiscriminator, hinge_d_loss, r1_penalty
from networks.perceptual import PerceptualLoss, trunk_state_dict
from networks.quantizer import VectorQuantizer


def _nets(latent=16, out=None, mult=(1, 2)):
    enc = Encoder(
        channels=16, channel_mult=mult, num_res_blocks=1, attention=True, out_channels=out or latent
    )
    dec = Decoder(in_channels=latent, channels=16, channel_mult=mult, num_res_blocks=1, attention=True)
    return enc, dec


def _vq(disc=True, **kw):
    enc, dec = _nets()
    quantizer = VectorQuantizer(64, dim=16, codebook_dim=8, cosine=True, ema=True, dead_code_threshold=0.1)
    discriminator = PatchDiscriminator(channels=16, num_layers=2) if disc else None
    kw.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=2e-3))
    return VQAutoencoder(enc, dec, quantizer, image_size=16, discriminator=discriminator, **kw)


def _images(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 3, size, size)
    for i in range(n):  # a coloured block at a random place on black
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        x[i, :, r : r + 6, c : c + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


def _trainer(steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", **kw)  # fmt: skip


def _loader(x, repeats):
    return DataLoader([{"image": x, "caption": [""] * len(x)}] * repeats, batch_size=None)


@pytest.mark.parametrize("mult", [(1, 2, 2), (1, 1, 2, 2), (1, 1, 2, 2, 4)])
def test_encoder_and_decoder_downsample_by_the_factor_of_their_levels(mult):
    enc, dec = _nets(mult=mult)
    x = torch.randn(1, 3, 32, 32)
    z = enc(x)
    f = 2 ** (len(mult) - 1)
    assert enc.downsample_factor == dec.upsample_factor == f in (4, 8, 16)
    assert z.shape == (1, 16, 32 // f, 32 // f)
    assert dec(z).shape == x.shape


def test_autoencoder_contract_shapes_and_ranges():
    model = _vq().eval()
    x = _images(2)
    latents, indices = model.encode(x)
    assert latents.shape == (2, *model.latent_shape) == (2, 16, 8, 8)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long and indices.max() < model.codebook_size
    for images in (model.decode(latents), model.decode_indices(indices)):
        assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(model.decode(latents), model.decode_indices(indices), atol=1e-5)
    assert model.downsample_factor == 2 and model.latent_channels == 16
    model.train()  # encode never updates the codebook, even in training mode
    codes, counts = model.quantizer.codebook.clone(), model.quantizer.ema_count.clone()
    model.encode(x)
    assert torch.equal(model.quantizer.codebook, codes) and torch.equal(model.quantizer.ema_count, counts)
    enc, dec = _nets(latent=4, out=8)
    kl = KLAutoencoder(enc, dec, latent_channels=4, image_size=16).eval()
    z = kl.encode(x)
    assert z.shape == (2, 4, 8, 8) and kl.latent_shape == (4, 8, 8)
    assert torch.equal(kl.encode(x), z)  # the posterior mean
    assert not torch.equal(kl.encode(x, sample=True), z)
    assert kl.decode(z).shape == x.shape


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    y = net(x)
    rec = (y - 1).pow(2).mean()
    g = -y.sum() * 0.1
    last = net[2].weight
    rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    w = adaptive_weight(rec, g, last)
    assert torch.isclose(w, rec_grad.norm() / (g_grad.norm() + 1e-4))
    assert not w.requires_grad
    assert adaptive_weight(rec * 1e9, g * 1e-9, last) == 1e4  # clamped


def test_the_adaptive_weight_is_taken_at_the_layer_that_makes_the_image(monkeypatch):
    """In a training step after disc_start, the parameter given to adaptive_weight is the weight of
    the last layer the decoder runs (the output convolution, as in taming), not an earlier one."""
    from lightning_modules import autoencoder as ae

    torch.manual_seed(0)
    model = _vq(disc_start=0)
    order = []
    for module in model.decoder.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(lambda m, i, o: order.append(m.weight))
    given = []
    real = ae.adaptive_weight
    monkeypatch.setattr(ae, "adaptive_weight", lambda rec, g, last, *a: (given.append(last), real(rec, g, last, *a))[1])
    _trainer(1, limit_val_batches=0).fit(model, _loader(_images(), 1))
    assert given and order and given[0] is order[-1]


def test_the_kl_term_is_the_closed_form_kl_weighted_per_pixel():
    """latent-diffusion's weighting: kl_weight x KL(posterior || N(0, I)) summed over the latent,
    divided by the pixels of an image (here the reconstruction loss is a per-pixel mean)."""
    from torch.distributions import Normal, kl_divergence

    enc, dec = _nets(latent=4, out=8)
    model = KLAutoencoder(enc, dec, latent_channels=4, image_size=16, kl_weight=0.5).train()
    h = torch.randn(2, 8, 8, 8)
    _, loss, logs = model.bottleneck(h)
    mean, logvar = h.chunk(2, dim=1)
    kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert torch.isclose(logs["kl"], kl, rtol=1e-5)
    assert torch.isclose(loss, 0.5 * kl / (3 * 16 * 16), rtol=1e-5)  # a 16 px RGB image, f = 2


def test_discriminator_is_off_before_disc_start_and_on_after_with_the_adaptive_weight():
    torch.manual_seed(0)
    model = _vq(disc_start=3, disc_weight=0.5)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append({k: float(m[k]) for k in ("train/loss", "train/rec_loss", "train/commit_loss", "train/g_loss",
                                                  "train/disc_weight", "train/d_loss") if k in m})  # fmt: skip

    d_before = [p.clone() for p in model.discriminator.parameters()]
    _trainer(5, callbacks=[Spy()], limit_val_batches=0).fit(model, _loader(_images(), 20))
    # three autoencoder steps alone (global steps 1-3), then autoencoder + discriminator per batch
    assert model.steps == {"ae": 4, "d": 1} and model.global_step == 5
    for s in seen[:3]:
        assert "train/g_loss" not in s and "train/d_loss" not in s
        # before disc_start the loss is the reconstruction plus the quantizer's beta * commitment alone
        assert s["train/loss"] == pytest.approx(s["train/rec_loss"] + 0.25 * s["train/commit_loss"], rel=1e-5)
    after = seen[3]
    assert after["train/disc_weight"] > 0
    assert after["train/loss"] == pytest.approx(after["train/rec_loss"] + 0.25 * after["train/commit_loss"]
                                                + 0.5 * after["train/disc_weight"] * after["train/g_loss"], rel=1e-4)  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))


def test_r1_sees_each_image_alone_with_group_norm_but_not_with_batch_norm():
    """The batch's R1 is the mean of the images' own penalties when the discriminator has no batch
    statistics (group norm, the VQGAN config's); with batch norm each image's gradient depends on
    the others, hence the warning."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    for norm, independent in (("group", True), ("batch", False)):
        d = PatchDiscriminator(channels=8, num_layers=2, norm=norm).train()
        together = r1_penalty(d, x)[1]
        alone = torch.stack([r1_penalty(d, x[i : i + 1])[1] for i in range(4)]).mean()
        assert torch.isclose(together, alone, rtol=1e-4) == independent, norm
    with pytest.warns(UserWarning, match="norm: group"):
        _vq(d_r1_weight=10.0)  # the helper's discriminator uses batch norm


def test_r1_penalty_is_the_squared_input_gradient_of_the_mean_patch_logit():
    d = nn.Conv2d(3, 1, 1, bias=True)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    x = torch.randn(4, 3, 5, 5)
    logits, r1 = r1_penalty(d, x)
    assert torch.equal(logits, d(x))
    # mean patch logit = mean over the 25 pixels of w . x_p: its gradient is w / 25 at each pixel
    assert torch.isclose(r1, torch.tensor(5.25 / 25))
    assert r1.requires_grad  # it trains the discriminator (double backpropagation)
    model = _vq(disc_start=0, d_r1_weight=10.0)
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    _trainer(2, callbacks=[Spy()], limit_val_batches=0).fit(model, _loader(_images(), 2))
    assert seen["train/r1"] > 0


def test_hinge_discriminator_loss():
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])) == 0
    assert hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])) == 1.0


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_overfitting_a_batch_lowers_the_reconstruction_loss(kind):
    torch.manual_seed(0)
    if kind == "vq":
        model = _vq(disc=False)
    else:
        enc, dec = _nets(latent=4, out=8)
        model = KLAutoencoder(
            enc, dec, latent_channels=4, image_size=16, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3)
        )
    x = _images()
    before = float((model.reconstruct(x) - x).abs().mean())
    model.train()
    _trainer(150, limit_val_batches=0).fit(model, _loader(x, 150))
    model.eval()
    after = float((model.reconstruct(x) - x).abs().mean())
    assert after < 0.4 * before, (before, after)
    assert psnr(x, model.reconstruct(x)).mean() > 18


def test_validation_logs_codebook_usage_over_the_epoch_and_psnr():
    torch.manual_seed(0)
    model = _vq(disc=False)
    trainer = _trainer(1, limit_val_batches=3)
    x = [_images(4, seed=s) for s in range(3)]
    val = DataLoader([{"image": xi, "caption": [""] * 4} for xi in x], batch_size=None)
    trainer.validate(model, val)
    model.eval()
    counts = torch.zeros(64)
    for xi in x:
        counts += torch.bincount(model.encode(xi)[1].flatten(), minlength=64)
    m = trainer.callback_metrics
    assert float(m["val/codebook_usage"]) == pytest.approx(float((counts > 0).float().mean()))
    assert float(m["val/psnr"]) == pytest.approx(
        float(torch.cat([psnr(xi, model.reconstruct(xi)) for xi in x]).mean()), rel=1e-4
    )
    assert 1 <= float(m["val/perplexity"]) <= 64


def test_checkpoint_round_trips_codes_ema_state_discriminator_optimizers_and_reconstructions(tmp_path):
    torch.manual_seed(0)
    model = _vq(disc_start=2)
    trainer = _trainer(6, limit_val_batches=0)
    trainer.fit(model, _loader(_images(), 10))
    path = str(tmp_path / "vq.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["optimizer_steps"] == {"ae": 4, "d": 2}
    loaded = VQAutoencoder.load_from_checkpoint(path, weights_only=False)
    for key in ("quantizer.codebook", "quantizer.ema_sum", "quantizer.ema_count"):
        assert torch.equal(model.state_dict()[key], loaded.state_dict()[key]), key
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    model.eval(), loaded.eval()
    x = _images(2, seed=5)
    assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    resumed = _vq(disc_start=2)
    _trainer(8, limit_val_batches=0).fit(resumed, _loader(_images(), 10), ckpt_path=path, weights_only=False)
    assert resumed.steps == {"ae": 5, "d": 3} and resumed.global_step == 8


def _random_vgg_file(path):
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
    torch.save(state, path)
    return state


def test_perceptual_loss_reads_its_trunk_from_a_local_file_or_folder(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    state = _random_vgg_file(folder / "vgg16-397923af.pth")
    for where in (str(folder / "vgg16-397923af.pth"), str(folder)):
        loss = PerceptualLoss(where)
        trunk = loss.lpips.net.state_dict()
        for key, value in trunk_state_dict(state, "vgg").items():
            assert torch.equal(trunk[key], value), key
        assert not any(p.requires_grad for p in loss.parameters())
        x = _images(2, size=32)
        assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
        assert (loss(x, x.flip(0)) > 0).all()
        heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                           map_location="cpu", weights_only=True)  # fmt: skip
        mine = loss.lpips.state_dict()
        assert len(heads) == 5 and all(torch.equal(mine[key], value) for key, value in heads.items())
        assert loss.training is False
        loss.train()
        assert loss.training is False


def test_perceptual_loss_trains_the_autoencoder_and_stays_out_of_its_checkpoint(tmp_path):
    weights = tmp_path / "vgg.pth"
    _random_vgg_file(weights)
    enc, dec = _nets()
    quantizer = VectorQuantizer(64, dim=16)
    model = VQAutoencoder(
        enc, dec, quantizer, image_size=16, perceptual_weight=1.0, perceptual_path=str(weights)
    )
    trainer = _trainer(2, limit_val_batches=0)
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer.callbacks.append(Spy())
    trainer.fit(model, _loader(_images(), 2))
    assert seen["train/perceptual"] > 0
    assert seen["train/rec_loss"] == pytest.approx(seen["train/pixel"] + seen["train/perceptual"], rel=1e-5)
    path = str(tmp_path / "ae.ckpt")
    trainer.save_checkpoint(path)
    keys = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("perceptual.") for k in keys)
    os.remove(weights)  # the frozen loader needs no perceptual weights
    frozen = load_autoencoder(path)
    assert frozen.perceptual is None


def test_frozen_autoencoder_loads_from_a_checkpoint_path_and_works_without_a_trainer(tmp_path):
    torch.manual_seed(0)
    model = _vq(disc=False)
    trainer = _trainer(3, limit_val_batches=0)
    trainer.fit(model, _loader(_images(), 3))
    path = str(tmp_path / "ae.ckpt")
    trainer.save_checkpoint(path)
    frozen = load_autoencoder(path)
    assert isinstance(frozen, VQAutoencoder) and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    x = _images(2, seed=3)
    codes_before = frozen.quantizer.codebook.clone()
    latents, indices = frozen.encode(x)
    assert torch.equal(frozen.quantizer.codebook, codes_before)  # eval: no EMA update, no restart
    model.eval()
    assert torch.equal(frozen.decode_indices(indices), model.decode_indices(model.encode(x)[1]))
    enc, dec = _nets(latent=4, out=8)
    kl = KLAutoencoder(enc, dec, latent_channels=4, image_size=16)
    trainer = _trainer(1, limit_val_batches=0)
    trainer.fit(kl, _loader(_images(), 1))
    trainer.save_checkpoint(str(tmp_path / "kl.ckpt"))
    frozen_kl = load_autoencoder(str(tmp_path / "kl.ckpt"))
    assert isinstance(frozen_kl, KLAutoencoder) and frozen_kl.encode(x).shape == (2, 4, 8, 8)
    with pytest.raises(MissingFileError, match="autoencoder checkpoint"):
        load_autoencoder(str(tmp_path / "nothing.ckpt"))


def test_kl_term_is_the_gaussian_kl_from_the_standard_normal():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(KLAutoencoder.kl(mean, logvar), expected, atol=1e-5)


def test_settings_that_cannot_work_are_clear_errors(tmp_path):
    enc, dec = _nets()
    with pytest.raises(ConfigError, match="image_size 17 is not a multiple of the downsampling factor 2"):
        VQAutoencoder(enc, dec, VectorQuantizer(8, dim=16), image_size=17)
    with pytest.raises(
        MissingFileError, match="model.init_args.perceptual_path: .*does not exist.*perceptual weight to 0"
    ):
        VQAutoencoder(enc, dec, VectorQuantizer(8, dim=16), image_size=16, perceptual_weight=1.0,
                      perceptual_path=str(tmp_path / "missing.pth"))  # fmt: skip
    with pytest.raises(ConfigError, match="perceptual_weight: 0"):
        VQAutoencoder(enc, dec, VectorQuantizer(8, dim=16), image_size=16, perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="same latent dimension"):
        VQAutoencoder(enc, dec, VectorQuantizer(8, dim=8), image_size=16)
