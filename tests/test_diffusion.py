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
    images, captions = _pairs()
    model = tiny(cond_drop_prob=0.2, ema_decay=0.0, prediction="x0", min_snr_gamma=None)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    batch = {"image": images.repeat(4, 1, 1, 1), "caption": captions * 4}
    for _step in range(400):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    model.ema_denoiser.load_state_dict(model.denoiser.state_dict())
    model.ema_text_encoder.load_state_dict(model.text_encoder.state_dict())
    out = model.eval().generate(captions, seed=0, sampler="ddim", steps=20, guidance_scale=2.0)
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


def test_super_resolution_and_cascade(tmp_path):
    base = tiny(image_size=8)
    sr = tiny(image_size=16, cls=SuperResolutionDiffusion, cond_channels=3, low_res_size=8)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a", "b"]}
    cond = sr.conditioning(batch)
    assert cond["cond_image"].shape == (2, 3, 16, 16) and cond["aug_level"].max() < 300
    assert sr.loss(batch).isfinite()
    with pytest.raises(NotImplementedError, match="low_res"):
        sr.generate(["a"])
    paths = []
    for name, m in (("base", base), ("sr", sr)):
        trainer = Trainer(logger=False, accelerator="cpu", max_steps=0)
        trainer.strategy.connect(m)
        paths.append(str(tmp_path / f"{name}.ckpt"))
        trainer.save_checkpoint(paths[-1])
    cascade = DiffusionCascade(paths[0], [paths[1]], base_sampling={"steps": 3}, sr_sampling={"steps": 3})
    out = cascade.generate(["a red circle", "a blue square"], seed=0)
    assert out.shape == (2, 3, 16, 16)
    low = base.generate(["a red circle", "a blue square"], seed=0, steps=3)
    # the high-resolution output follows its low-resolution input
    down = torch.nn.functional.interpolate(out, size=8, mode="area")
    assert out.abs().max() <= 1 and torch.isfinite(down).all() and low.shape == (2, 3, 8, 8)
