"""The diffusion method: guidance, learning, conditioning, checkpoints, cascade."""

import os

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_modules.diffusion import DiffusionCascade, SuperResolutionDiffusion, TextToImageDiffusion
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet


def tiny(image_size=8, cls=TextToImageDiffusion, cond_channels=0, **kw):
    torch.manual_seed(0)
    unet = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32, heads=2,
                cond_channels=cond_channels)  # fmt: skip
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    kw.setdefault("prediction", "eps")  # the tests' algebra is written for eps; the class defaults are tested below
    return cls(unet, text, image_size=image_size, **kw)


def test_guidance_scale_one_is_exactly_the_conditional_prediction():
    model = tiny().eval()
    with torch.no_grad():  # leave the zero-initialised output layer so that outputs are not all zero
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calls = []
    model.ema_denoiser.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    prompts = ["a red circle", "a blue square"]
    x0, eps = model.denoise_fn(prompts, 1.0, None, True, {})(x, t)
    ref = model.ema_denoiser(x, t, model.encode(prompts, ema=True))
    assert torch.equal(eps, ref) and calls == [2, 2]  # one conditional pass, no unconditional one
    _, eps3 = model.denoise_fn(prompts, 3.0, None, True, {})(x, t)
    assert calls[-1] == 4 and not torch.allclose(eps3, ref)


def test_same_seed_same_images_and_samplers_agree_in_shape():
    model = tiny().eval()
    a = model.generate(["a red circle"], seed=3, steps=5)
    assert torch.equal(a, model.generate(["a red circle"], seed=3, steps=5))
    assert not torch.equal(a, model.generate(["a red circle"], seed=4, steps=5))
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        out = model.generate(["x", "y"], seed=0, sampler=sampler, steps=4, dynamic_threshold=0.99)
        assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_overfitting_one_batch_lowers_the_loss(prediction):
    model = tiny(prediction=prediction)
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1, "caption": ["a", "b", "c", "d"]}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def fixed_loss():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return model.loss(batch, cond_drop_prob=0.0).item()

    before = fixed_loss()
    for _ in range(60):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert fixed_loss() < 0.5 * before


def _pairs():
    """Four captions, each with its own image: a coloured block in its own quadrant."""
    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
    images, captions = [], []
    for i, (name, rgb) in enumerate(colours.items()):
        img = -torch.ones(3, 8, 8)
        r, c = divmod(i, 2)
        img[:, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)
        images.append(img)
        captions.append(f"{name} block")
    return torch.stack(images), captions


def test_each_caption_generates_its_own_image():
    """At the class's default parameterisation (v on a zero-terminal-SNR cosine schedule, min-SNR
    weights) and its default sampler (DPM-Solver++, 20 steps)."""
    images, captions = _pairs()
    model = tiny(cond_drop_prob=0.2, ema_decay=0.0, prediction=None)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    batch = {"image": images.repeat(4, 1, 1, 1), "caption": captions * 4}
    for _step in range(400):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    model.ema_denoiser.load_state_dict(model.denoiser.state_dict())
    model.ema_text_encoder.load_state_dict(model.text_encoder.state_dict())
    assert model.prediction == "v" and model.schedule.alphas_cumprod[-1] == 0
    out = model.eval().generate(captions, seed=0, guidance_scale=2.0)
    dist = torch.cdist(out.flatten(1), images.flatten(1))  # (generated, target)
    assert torch.equal(dist.argmin(1), torch.arange(4)), dist


def test_checkpoint_round_trip_keeps_ema_and_raw_weights(tmp_path):
    model = tiny(ema_decay=0.5)
    batch = {
        "image": torch.rand(4, 3, 8, 8) * 2 - 1,
        "caption": ["a", "b", "c", "d"],
        "key": list("abcd"),
        "meta": [{}] * 4,
    }
    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch] * 3, batch_size=None))
    assert not torch.equal(model.ema_denoiser.input.weight, model.denoiser.input.weight)  # EMA moved, lagging
    path = os.path.join(tmp_path, "m.ckpt")
    trainer.save_checkpoint(path)
    loaded = TextToImageDiffusion.load_from_checkpoint(path, weights_only=False)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(model.generate(["a"], seed=1, steps=3), loaded.generate(["a"], seed=1, steps=3))


class UpsampledInput(torch.nn.Module):
    """A stand-in super-resolution x0-predictor that returns its conditioning image as the answer."""

    def forward(self, x, t, text, cond_image=None, aug_level=None):
        return cond_image


def test_super_resolution_stage_follows_its_low_resolution_input():
    """The low-resolution image must reach the denoiser, in training and in ``generate``: with a
    stand-in that answers its conditioning image, the output downsampled is the input."""
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    sr = SuperResolutionDiffusion(UpsampledInput(), text, image_size=16, low_res_size=8, prediction="x0",
                                  sample_aug_level=0.0, min_snr_gamma=None)  # fmt: skip
    low = smooth_images(2, 8)
    out = sr.generate(["a", "b"], low_res=low, seed=0, steps=4, guidance_scale=1.0)
    down = torch.nn.functional.interpolate(out, size=8, mode="area")
    assert (down - low).abs().max() < 0.05
    other = sr.generate(["a", "b"], low_res=-low, seed=0, steps=4, guidance_scale=1.0)
    assert (other - out).abs().mean() > 0.5  # a different input gives a different image
    # training: the conditioning image is the batch's own image at low resolution (level 0: clean)
    batch = {"image": smooth_images(2, 16), "caption": ["a", "b"]}
    torch.manual_seed(0)
    sr.max_aug_level = 0.0
    cond = sr.conditioning(batch)
    small = torch.nn.functional.interpolate(batch["image"], size=8, mode="bilinear", antialias=True)
    assert torch.allclose(
        torch.nn.functional.interpolate(cond["cond_image"], size=8, mode="area"), small, atol=0.05
    )


def smooth_images(b, size):
    """(b, 3, size, size) in [-1, 1], smooth enough that resizing down and up keeps them."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.arange(3 * b, dtype=torch.float32).view(b, 3, 1, 1)
    return 0.8 * torch.sin(2.0 * x + 1.5 * y + phase)


def test_super_resolution_and_cascade(tmp_path):
    base = tiny(image_size=8)
    sr = tiny(image_size=16, cls=SuperResolutionDiffusion, cond_channels=3, low_res_size=8)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a", "b"]}
    cond = sr.conditioning(batch)
    assert cond["cond_image"].shape == (2, 3, 16, 16) and cond["aug_level"].max() < 300
    assert sr.loss(batch).isfinite()
    with pytest.raises(NotImplementedError, match="low_res"):
        sr.generate(["a"])
    paths = save_untrained(tmp_path, base=base, sr=sr)
    cascade = DiffusionCascade(paths[0], [paths[1]], base_sampling={"steps": 3}, sr_sampling={"steps": 3})
    out = cascade.generate(["a red circle", "a blue square"], seed=0)
    assert out.shape == (2, 3, 16, 16)
    # the cascade is the base stage, then the super-resolution stage on its output
    low = base.generate(["a red circle", "a blue square"], seed=0, steps=3)
    assert torch.allclose(out, sr.generate(["a red circle", "a blue square"], low_res=low, seed=0, steps=3))
    with pytest.raises(TypeError, match="its options are: sampler, steps"):
        DiffusionCascade(paths[0], [paths[1]], base_sampling={"stpes": 3})


def save_untrained(tmp_path, **models) -> list[str]:
    paths = []
    for name, m in models.items():
        trainer = Trainer(logger=False, accelerator="cpu", max_steps=0)
        trainer.strategy.connect(m)
        paths.append(str(tmp_path / f"{name}.ckpt"))
        trainer.save_checkpoint(paths[-1])
    return paths


def _guided_halves(model):
    """Prompts, ``x``, ``t`` and the EMA network's conditional and unconditional outputs there (its
    zero-initialised output layer jittered, so that outputs are not all zero)."""
    with torch.no_grad():
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    prompts = ["a red circle", "a blue square"]
    c = model.ema_denoiser(x, t, model.encode(prompts, ema=True))
    u = model.ema_denoiser(x, t, model.encode(["", ""], ema=True))
    return prompts, x, t, c, u


def test_classifier_free_guidance_is_u_plus_s_times_c_minus_u():
    prompts, x, t, c, u = _guided_halves(model := tiny().eval())
    for scale in (0.0, 2.5, 7.0):
        _, eps = model.denoise_fn(prompts, scale, None, True, {})(x, t)
        assert torch.allclose(eps, u + scale * (c - u), atol=1e-5), scale


def test_guidance_rescale_is_applied_to_the_guided_prediction():
    from networks.diffusion import rescale_guidance

    prompts, x, t, c, u = _guided_halves(model := tiny(prediction="v").eval())
    expected = model.schedule.to_x0_eps("v", rescale_guidance(u + 5.0 * (c - u), c, 0.7), x, t)[0]
    x0, _ = model.denoise_fn(prompts, 5.0, None, True, {}, guidance_rescale=0.7)(x, t)
    assert torch.allclose(x0, expected, atol=1e-5)
    plain, _ = model.denoise_fn(prompts, 5.0, None, True, {})(x, t)
    assert not torch.allclose(x0, plain, atol=1e-3)


def test_zero_terminal_snr_samples_from_pure_noise_and_refuses_eps_prediction():
    from networks.errors import ConfigError

    with pytest.raises(ConfigError, match="prediction: v"):
        tiny(zero_terminal_snr=True, prediction="eps")
    model = tiny(zero_terminal_snr=True, prediction="v", schedule="scaled_linear", clip_denoised=False).eval()
    assert model.schedule.alphas_cumprod[-1] == 0
    with torch.no_grad():
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        out = model.generate(["x", "y"], seed=0, sampler=sampler, steps=6, guidance_rescale=0.7)
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all(), sampler


def test_validation_loss_is_the_ema_weights_and_raw_loss_the_live_ones():
    model = tiny(ema_decay=0.5)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # live and EMA weights now differ
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1, "caption": ["a", "b", "c", "d"]}
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.validation_step(batch, 3)

    def fixed(use_ema):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return model.loss(batch, cond_drop_prob=0.0, use_ema=use_ema).item()

    assert logged["val/loss"] == pytest.approx(fixed(True)) and logged["val/loss_raw"] == pytest.approx(
        fixed(False)
    )
    assert logged["val/loss"] != pytest.approx(logged["val/loss_raw"])


def test_ema_moves_once_per_optimizer_step_under_gradient_accumulation(monkeypatch):
    import lightning_modules.diffusion as diffusion

    calls = []
    real = diffusion.ema_update
    monkeypatch.setattr(
        diffusion, "ema_update", lambda ema, live, decay: (calls.append(decay), real(ema, live, decay))
    )
    model = tiny(ema_decay=0.9)
    batch = {
        "image": torch.rand(2, 3, 8, 8) * 2 - 1,
        "caption": ["a", "b"],
        "key": ["a", "b"],
        "meta": [{}, {}],
    }
    trainer = Trainer(max_epochs=1, accumulate_grad_batches=4, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch] * 8, batch_size=None))
    assert trainer.global_step == 2
    per_step = 2 if model.ema_text_encoder is not None else 1  # denoiser and trainable text encoder
    assert len(calls) == 2 * per_step  # 8 batches, 2 optimizer steps, 2 EMA updates
    assert calls[0] == pytest.approx(0.1) and calls[-1] == pytest.approx(2 / 11)  # warm-up at steps 0 and 1


def test_per_prompt_seeds_make_each_image_independent_of_its_batch():
    model = tiny().eval()
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        kw = {"sampler": sampler, "steps": 5, "eta": 1.0}
        together = model.generate(prompts, seed=[7, 8, 9], **kw)
        alone = torch.cat([model.generate([p], seed=[s], **kw) for p, s in zip(prompts, [7, 8, 9])])
        assert torch.allclose(together, alone, atol=1e-5), sampler
        assert not torch.allclose(together[0], model.generate(prompts[:1], seed=[10], **kw)[0])


def test_unknown_sampling_options_name_the_methods_options(tmp_path):
    model = tiny()
    with pytest.raises(
        TypeError, match=r"does not take 'stpes'; its options are: sampler, steps, guidance_scale"
    ):
        model.generate(["a"], stpes=3)
    sr = tiny(image_size=16, cls=SuperResolutionDiffusion, cond_channels=3, low_res_size=8)
    assert sr.sampling_options()[0] == "low_res" and "guidance_scale" in sr.sampling_options()
    with pytest.raises(TypeError, match="its options are: low_res, sampler"):
        sr.generate(["a"], low_res=torch.zeros(1, 3, 8, 8), all_scales=True)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        model.generate(["a"], sampler="euler")


def _tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)  # fmt: skip


def test_a_frozen_pretrained_encoder_stays_out_of_the_checkpoint_and_is_read_from_its_path(tmp_path):
    from networks.text_encoders import PretrainedTextEncoder

    _tiny_bert(str(tmp_path / "bert"))
    torch.manual_seed(0)
    unet = UNet(
        base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32, heads=2
    )
    model = TextToImageDiffusion(
        unet, PretrainedTextEncoder(str(tmp_path / "bert"), max_length=8), image_size=8
    )
    with torch.no_grad():
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (path,) = save_untrained(tmp_path, frozen=model)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("text_encoder.")] and [
        k for k in state if k.startswith("denoiser.")
    ]
    loaded = TextToImageDiffusion.load_from_checkpoint(path, weights_only=False)
    assert torch.equal(
        model.generate(["a red circle"], seed=1, steps=3), loaded.generate(["a red circle"], seed=1, steps=3)
    )


def test_predict_makes_one_generate_call_per_batch_and_each_image_is_its_own(monkeypatch):
    model = tiny().eval()
    calls = []
    generate = model.generate
    monkeypatch.setattr(
        model, "generate", lambda prompts, **kw: (calls.append(len(prompts)), generate(prompts, **kw))[1]
    )
    batch = {
        "caption": ["a red circle", "a red circle", "two blue squares"],
        "seed": [0, 1, 0],
        "index": [0, 0, 1],
    }
    together = model.predict_step(batch, 0)["image"]
    assert calls == [3]
    alone = [model.predict_step({k: [v[i]] for k, v in batch.items()}, i)["image"][0] for i in range(3)]
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)
    assert not torch.allclose(together[0], together[1])  # same prompt, other seed


def test_generate_applies_the_guidance_rescale_it_is_given_and_its_default():
    model = tiny().eval()
    with torch.no_grad():
        for p in model.ema_denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = ["a red circle", "a blue square"]
    plain = model.generate(prompts, seed=0, steps=4, guidance_scale=4.0, guidance_rescale=0.0)
    rescaled = model.generate(prompts, seed=0, steps=4, guidance_scale=4.0, guidance_rescale=0.7)
    assert not torch.allclose(plain, rescaled)
    model.sampling_defaults["guidance_rescale"] = 0.7
    assert torch.equal(model.generate(prompts, seed=0, steps=4, guidance_scale=4.0), rescaled)
