"""Latent diffusion: the diffusion method in a frozen autoencoder's latent space. The scale factor
is estimated once, saved and reused on resume; the autoencoder stays out of the checkpoint; four
captions generate their own images; settings that cannot work are clear errors."""

import os

import lightning as L
import pytest
import torch
import yaml
from conftest import BLOCK_CAPTIONS, block_images
from torch.utils.data import DataLoader

from lightning_modules.diffusion import SuperResolutionDiffusion, TextToImageDiffusion
from networks.errors import ConfigError, MissingFileError
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "diffusion")


def test_the_class_defaults_are_each_space_s_measured_pair_and_the_configs_keep_them(tiny_autoencoders):
    """Left unset, latent diffusion is eps on the scaled-linear schedule and pixel diffusion v on a
    zero-terminal-SNR cosine schedule (BENCHMARKS.md); the shapes configs say the same."""
    latent = _latent(tiny_autoencoders["kl"])
    assert (latent.hparams.schedule, latent.prediction, latent.schedule.alphas_cumprod[-1] > 0) == (None, "eps", True)
    assert latent.schedule.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=2e-4)  # scaled-linear's end
    unet = UNet(base_channels=16, channel_mult=[1], num_res_blocks=1, attention_levels=[], context_dim=32, heads=2)
    pixel = TextToImageDiffusion(unet, TransformerTextEncoder(width=32, depth=1, heads=2, max_length=8, tokenizer="byte"))
    assert pixel.prediction == "v" and pixel.schedule.alphas_cumprod[-1].item() == 0.0  # zero terminal SNR
    eps = TextToImageDiffusion(unet, TransformerTextEncoder(width=32, depth=1, heads=2, max_length=8, tokenizer="byte"),
                               prediction="eps")  # fmt: skip
    assert eps.schedule.alphas_cumprod[-1].item() > 0  # an eps model is not put on a zero-SNR schedule
    with open(os.path.join(CONFIG, "latent_shapes.yaml")) as f:
        args = yaml.safe_load(f)["model"]["init_args"]
    assert (args.get("schedule", "scaled_linear"), args.get("prediction", "eps"), args.get("zero_terminal_snr", False)) == (
        "scaled_linear", "eps", False)  # fmt: skip
    for name in ("shapes.yaml", "shapes32.yaml"):
        with open(os.path.join(CONFIG, name)) as f:
            args = yaml.safe_load(f)["model"]["init_args"]
        assert (args.get("schedule", "cosine"), args.get("prediction", "v"), args.get("zero_terminal_snr", True)) == (
            "cosine", "v", True), name  # fmt: skip


def _latent(path, channels=4, **kw):
    torch.manual_seed(0)
    unet = UNet(in_channels=channels, out_channels=channels, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                attention_levels=[1], context_dim=32, heads=2)  # fmt: skip
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    kw.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=2e-3))
    return TextToImageDiffusion(unet, text, image_size=16, autoencoder=path, **kw)


def _batches(n, repeat=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = block_images().repeat(repeat, 1, 1, 1)
    return [{"image": x * (0.5 + torch.rand(1, generator=g)), "caption": list(BLOCK_CAPTIONS) * repeat}
            for _ in range(n)]  # fmt: skip


def _trainer(steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", limit_val_batches=0, **kw)  # fmt: skip


def test_latent_scale_is_one_over_the_first_batch_std_and_is_kept_on_resume(tiny_autoencoders, tmp_path):
    model = _latent(tiny_autoencoders["kl"])
    assert model.latent_scale == 0  # not estimated yet
    batches = _batches(6)
    trainer = _trainer(3)
    trainer.fit(model, DataLoader(batches[:3], batch_size=None))
    first = model.autoencoder.encode_latents(batches[0]["image"]).float()
    assert torch.isclose(model.latent_scale, 1.0 / first.std(unbiased=True), rtol=1e-5)
    path = str(tmp_path / "latent.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert (
        "latent_scale" in state
        and "latent_bound" not in state  # nothing clamps latents any more
        and not any(k.startswith("autoencoder.") for k in state)
    )
    resumed = _latent(tiny_autoencoders["kl"])
    _trainer(5).fit(
        resumed, DataLoader(batches[3:], batch_size=None), ckpt_path=path, weights_only=False
    )  # other batches, other std
    assert torch.equal(resumed.latent_scale, model.latent_scale)
    # a scale given in the config is used as it is
    fixed = _latent(tiny_autoencoders["kl"], latent_scale=0.5)
    _trainer(1).fit(fixed, DataLoader(batches[:1], batch_size=None))
    assert fixed.latent_scale == 0.5


def test_the_scale_comes_from_the_first_training_batch_not_the_sanity_check_validation(tiny_autoencoders):
    model = _latent(tiny_autoencoders["kl"])
    batches = _batches(4)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=1, limit_val_batches=1).fit(
        model, DataLoader(batches[:1], batch_size=None), DataLoader(batches[3:], batch_size=None))  # fmt: skip
    first = model.autoencoder.encode_latents(batches[0]["image"]).float()
    assert torch.isclose(model.latent_scale, 1.0 / first.std(unbiased=True), rtol=1e-5)


def test_an_untrained_latent_model_never_collapses_the_images(tiny_autoencoders):
    """A model given latent_scale but not trained gives different images for different seeds (a
    clamp of x0 to an unset bound of 0 once made every image decode(0))."""
    model = _latent(tiny_autoencoders["kl"], latent_scale=1.0).eval()
    with torch.no_grad():
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a, b = model.generate(["a red square"], seed=0, steps=4), model.generate(["a red square"], seed=1, steps=4)
    assert not torch.allclose(a, b, atol=1e-3)


def test_loss_is_on_scaled_latents_and_generate_decodes_to_images(tiny_autoencoders):
    model = _latent(tiny_autoencoders["kl"], latent_scale=2.0)
    seen = []
    model.denoiser.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.loss({"image": block_images(), "caption": list(BLOCK_CAPTIONS)})
    assert seen[-1] == (4, 4, 4, 4)  # the denoiser works on (4, 4 x 4) latents of the 16 px images
    decoded = []
    decode = model.autoencoder.decode_latents
    model.autoencoder.decode_latents = lambda z: decoded.append(z) or decode(z)
    out = model.eval().generate(["a red square", "a blue square"], seed=0, steps=4, sampler="ddim")
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert len(decoded) == 1 and decoded[0].shape == (2, 4, 4, 4)  # the latents, decoded once
    for option in ({"dynamic_threshold": 0.995}, {"clip_denoised": True}):  # pixel-range clamps
        with pytest.raises(ValueError, match="latent"):
            model.generate(["a"], **option)


@pytest.mark.parametrize("kind", ["kl", pytest.param("vq", marks=pytest.mark.slow)])  # the default (kl) in the default suite
def test_each_of_four_captions_generates_its_own_image(tiny_autoencoders, kind):
    """With no clamp anywhere: the KL latents at the class's default parameterisation (eps on the
    scaled-linear schedule, min-SNR weights, DPM-Solver++ 20 steps); the VQ latents (8 pre-quantisation channels) with
    v-prediction on a zero-terminal-SNR schedule, since at the default two of their four captions
    still drew another caption's image after 300 (and 500) steps."""
    setup = {} if kind == "kl" else {"prediction": "v", "zero_terminal_snr": True}
    model = _latent(tiny_autoencoders[kind], channels=4 if kind == "kl" else 8, cond_drop_prob=0.2, ema_decay=0.0,
                    **setup)  # fmt: skip
    torch.manual_seed(0)
    _trainer(300).fit(model, DataLoader(_batches(1) * 300, batch_size=None))
    model.ema_denoiser.load_state_dict(model.denoiser.state_dict())
    model.ema_text_encoder.load_state_dict(model.text_encoder.state_dict())
    model.eval()
    targets = model.autoencoder.reconstruct(block_images())
    out = model.generate(list(BLOCK_CAPTIONS), seed=0, guidance_scale=2.0)  # the default sampler and steps
    dist = torch.cdist(out.flatten(1), targets.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(4)), dist


def test_a_latent_model_loads_from_its_checkpoint_and_the_autoencoder_path(tiny_autoencoders, tmp_path):
    model = _latent(tiny_autoencoders["kl"])
    trainer = _trainer(2)
    trainer.fit(model, DataLoader(_batches(2), batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = TextToImageDiffusion.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False).eval()
    assert torch.equal(loaded.latent_scale, model.latent_scale) and not loaded.autoencoder.training
    model.eval()
    assert torch.equal(loaded.generate(["a"], seed=3, steps=3), model.generate(["a"], seed=3, steps=3))


def test_settings_that_cannot_work_are_clear_errors(tiny_autoencoders, tmp_path):
    with pytest.raises(MissingFileError, match="model.init_args.autoencoder"):
        _latent(str(tmp_path / "none.ckpt"))
    with pytest.raises(ConfigError, match="in_channels and out_channels to 4"):
        _latent(tiny_autoencoders["kl"], channels=3)
    with pytest.raises(ConfigError, match="dynamic_threshold"):
        _latent(tiny_autoencoders["kl"], dynamic_threshold=0.995)
    with pytest.raises(ConfigError, match="clip_denoised .* latents"):
        _latent(tiny_autoencoders["kl"], clip_denoised=True)
    unet = UNet(in_channels=4, out_channels=4, base_channels=16, channel_mult=[1], num_res_blocks=1, attention_levels=[],
                context_dim=32)  # fmt: skip
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    with pytest.raises(ConfigError, match="image_size is 32 .* 16 px"):
        TextToImageDiffusion(unet, text, image_size=32, autoencoder=tiny_autoencoders["kl"])
    with pytest.raises(ConfigError, match="pixel space"):
        SuperResolutionDiffusion(unet, text, autoencoder=tiny_autoencoders["kl"])


def test_a_checkpoint_with_the_old_latent_bound_still_loads(tiny_autoencoders, tmp_path):
    """Checkpoints made while latents were clamped carry a latent_bound buffer: it is dropped, and an
    eps model, which was trained to be sampled clamped, says so."""
    model = _latent(tiny_autoencoders["kl"], latent_scale=1.5)
    _trainer(1).fit(model, DataLoader(_batches(1), batch_size=None))
    path = tmp_path / "old.ckpt"
    model.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["latent_bound"] = torch.tensor(7.4)
    torch.save(checkpoint, path)
    with pytest.warns(UserWarning, match="latent_bound"):
        loaded = TextToImageDiffusion.load_from_checkpoint(path, weights_only=False)
    assert loaded.latent_scale == 1.5 and "latent_bound" not in loaded.state_dict()


def test_the_scale_is_averaged_over_ranks(tiny_autoencoders):
    """Under DDP every rank scales by the mean of the ranks' first-batch variances, so all agree."""
    from types import SimpleNamespace

    model = _latent(tiny_autoencoders["kl"]).train()
    images = block_images()
    own = model.autoencoder.encode_latents(images).float().var()
    seen = []

    def reduce(value, reduce_op):  # the other rank's variance is 3x this one's
        seen.append(reduce_op)
        return (value + 3 * value) / 2

    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce), is_global_zero=False)
    model.to_latents(images)
    model._trainer = None
    assert seen == ["mean"]
    assert model.latent_scale.item() == pytest.approx(1.0 / (2 * own).sqrt().item(), rel=1e-5)


def test_latent_sample_trains_on_posterior_draws_and_validates_on_the_mean(tiny_autoencoders):
    model = _latent(tiny_autoencoders["kl"], latent_sample=True, latent_scale=1.0)
    images = block_images()
    mean = model.autoencoder.encode_latents(images).float()
    torch.manual_seed(0)
    a = model.train().to_latents(images)
    torch.manual_seed(1)
    b = model.to_latents(images)
    assert not torch.equal(a, b) and not torch.allclose(a, mean)  # draws, each its own
    assert (a - mean).abs().mean() < mean.abs().mean()  # around the mean
    assert torch.equal(model.eval().to_latents(images), mean)  # validation: the mean
    plain = _latent(tiny_autoencoders["kl"], latent_scale=1.0).train()
    assert torch.equal(plain.to_latents(images), mean)
    with pytest.raises(ConfigError, match="latent_sample"):
        _latent(tiny_autoencoders["vq"], channels=8, latent_sample=True)
