"""CLIP at sampling time: reranking another method's candidates (a fake CLIP's favourite wins,
N = 1 is the generator, candidates come in batches) and VQGAN+CLIP (the CLIP loss falls, a seed
repeats the image, the latent stays in the codebook's range); configs through ``predict``."""

import os

import pytest
import torch
from conftest import BLOCK_CAPTIONS
from test_cli import ROOT, run_cli

from lightning_modules.clip_guided import (
    VQGANCLIP,
    CLIPRerank,
    border_colour,
    colour_jitter,
    spherical_distance,
)
from networks.errors import ConfigError, MissingFileError


@pytest.fixture(scope="module")
def checkpoints(tiny_methods):
    """The tiny CLIP and conditional VAE (a stochastic generator) of conftest, on the block images."""
    return tiny_methods


class BrightnessCLIP(torch.nn.Module):
    """A fake CLIP whose similarity grows with an image's mean brightness, whatever the text."""

    image_size = None

    def encode_image(self, images):
        b = images.mean((1, 2, 3)).clamp(-1, 1)
        return torch.stack([b, (1 - b**2).sqrt()], -1)

    def encode_text(self, prompts):
        return torch.tensor([[1.0, 0.0]]).expand(len(prompts), 2)


def test_reranking_returns_the_candidate_the_clip_prefers(checkpoints):
    rerank = CLIPRerank(checkpoints["cvae"], checkpoints["clip"], candidates=5, batch_size=4)
    rerank.clip = BrightnessCLIP()
    prompts = BLOCK_CAPTIONS[:3]
    best = rerank.generate(prompts, seed=[7, 8, 9])
    images, scores = rerank.rank(prompts, seed=[7, 8, 9])
    assert images.shape == (3, 5, 3, 16, 16) and scores.shape == (3, 5)
    for i, seed in enumerate([7, 8, 9]):  # every candidate is the generator's own sample for its seed
        from networks.noise import stream_seed

        seeds = [seed] + [stream_seed(seed, "candidate", j) for j in range(1, 5)]
        own = rerank.method.generate([prompts[i]] * 5, seed=seeds)
        assert torch.allclose(images[i], own, atol=1e-6)
        brightest = own.mean((1, 2, 3)).argmax()
        assert torch.allclose(best[i], own[brightest], atol=1e-6)
    assert len(set(scores.argmax(1).tolist())) > 1 or scores.std() > 0  # a real choice was made


def test_one_candidate_is_the_wrapped_generator(checkpoints):
    rerank = CLIPRerank(checkpoints["cvae"], checkpoints["clip"], candidates=1, sampling={"temperature": 0.8})
    for seed in (3, [3, 4, 5, 6]):
        ours = rerank.generate(BLOCK_CAPTIONS, seed=seed)
        theirs = rerank.method.generate(BLOCK_CAPTIONS, seed=seed, temperature=0.8)
        assert torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(TypeError, match="does not take 'guidance'"):
        rerank.generate(BLOCK_CAPTIONS, seed=0, guidance=2.0)


def test_candidates_are_generated_in_batches_not_one_by_one(checkpoints):
    rerank = CLIPRerank(checkpoints["cvae"], checkpoints["clip"], candidates=4, batch_size=8)
    calls, original = [], rerank.method.generate
    rerank.method.generate = lambda prompts, **kw: calls.append(len(prompts)) or original(prompts, **kw)
    rerank.generate(BLOCK_CAPTIONS[:3], seed=0)
    assert calls == [8, 4]  # 3 prompts x 4 candidates in two calls


def test_reranking_predict_writes_every_candidate_with_its_score(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red block\na blue block\n")
    run_cli(["predict", "--config", os.path.join(ROOT, "configs", "clip", "rerank.yaml"),
             "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
             "--model.init_args.generator", checkpoints["cvae"], "--model.init_args.clip", checkpoints["clip"],
             "--model.init_args.candidates", "3", "--model.init_args.return_all", "true",
             "--data.init_args.image_size", "16", "--data.init_args.predict_prompts", str(prompts),
             "--run_name", "rr"], tmp_path)  # fmt: skip
    out = tmp_path / "runs" / "rr" / "predictions"
    files = sorted(os.listdir(out))
    assert len([f for f in files if "_candidate" in f]) == 6
    assert len([f for f in files if f.endswith(".png") and "_candidate" not in f and "grid" not in f]) == 2
    lines = (out / "scores.tsv").read_text().splitlines()
    assert (
        lines[0].split("\t") == ["index", "caption", "seed", "candidate", "score", "chosen"]
        and len(lines) == 7
    )


def test_bad_generator_and_clip_checkpoints_are_clear_errors(checkpoints, tiny_autoencoders, tmp_path):
    with pytest.raises(MissingFileError, match="model.init_args.generator: checkpoint .* not found"):
        CLIPRerank(str(tmp_path / "none.ckpt"), checkpoints["clip"])
    with pytest.raises(
        ConfigError, match="model.init_args.generator: .* is not a text-to-image method's checkpoint"
    ):
        CLIPRerank(checkpoints["clip"], checkpoints["clip"])
    with pytest.raises(ConfigError, match="model.init_args.clip: .* is not a CLIP checkpoint"):
        CLIPRerank(checkpoints["cvae"], checkpoints["cvae"])
    with pytest.raises(ConfigError, match="model.init_args.autoencoder: .* KLAutoencoder.*discrete codes"):
        VQGANCLIP(tiny_autoencoders["kl"], checkpoints["clip"])


def test_spherical_distance_is_the_squared_great_circle_distance():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    angles = torch.tensor([0.0, torch.pi / 2, torch.pi])
    assert torch.allclose(spherical_distance(x, y), angles**2 / 2, atol=1e-6)


def test_clip_guidance_lowers_the_clip_loss_and_a_seed_repeats_the_image(checkpoints, tiny_autoencoders):
    model = VQGANCLIP(
        tiny_autoencoders["vq"], checkpoints["clip"], steps=30, lr=0.2, cutouts=4, cut_noise=0.1
    )
    images = model.generate(BLOCK_CAPTIONS[:2], seed=[1, 2])
    curve = model.last_loss_curve
    assert images.shape == (2, 3, 16, 16) and curve.shape == (30, 2)
    # the whole image, seen without cutouts or augmentation, moved towards its prompt under CLIP
    start = model.generate(BLOCK_CAPTIONS[:2], seed=[1, 2], steps=0)
    with torch.no_grad():
        text = model.clip.encode_text(BLOCK_CAPTIONS[:2])
        before, after = (spherical_distance(model.clip.encode_image(x), text) for x in (start, images))
    assert (after < before - 0.01).all(), (before, after)
    assert torch.equal(model.generate(BLOCK_CAPTIONS[:2], seed=[1, 2]), images)
    alone = model.generate(BLOCK_CAPTIONS[1:2], seed=[2])  # the batch does not change a prompt's image
    assert torch.allclose(alone[0], images[1], atol=1e-4)
    assert not torch.equal(model.generate(BLOCK_CAPTIONS[:2], seed=[1, 3])[1], images[1])


@pytest.mark.parametrize("config", ["vqgan_clip.yaml", "gan_clip.yaml"])
def test_guidance_predict_configs_run_on_tiny_checkpoints(config, checkpoints, tiny_autoencoders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red block\n")
    generator = (["--model.init_args.autoencoder", tiny_autoencoders["vq"]] if config == "vqgan_clip.yaml"
                 else ["--model.init_args.generator", checkpoints["gan"]])  # fmt: skip
    run_cli(["predict", "--config", os.path.join(ROOT, "configs", "clip", config),
             "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
             *generator, "--model.init_args.clip", checkpoints["clip"],
             "--model.init_args.steps", "3", "--model.init_args.cutouts", "2",
             "--data.init_args.image_size", "16", "--data.init_args.predict_prompts", str(prompts),
             "--run_name", "vc"], tmp_path)  # fmt: skip
    out = tmp_path / "runs" / "vc" / "predictions"
    assert len([f for f in os.listdir(out) if f.startswith("0000_")]) == 1


def _red_circle(side=32):
    """A rendered shapes scene in [-1, 1]: a red circle on the dark background."""
    import numpy as np

    from datamodules.shapes import objects_for, render, single_attrs

    img = render(objects_for(single_attrs("red", "circle", "large", "center"), np.random.default_rng(0)), side)
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def test_the_augmentation_keeps_the_image_range_the_background_and_every_gradient():
    """Colour ops on an image in [-1, 1] (torchvision assumes [0, 1] and clamps) once zeroed the
    gradient of most of a red circle's pixels; the affine map filled uncovered corners with grey."""
    image = _red_circle()
    g = torch.Generator().manual_seed(0)
    x = ((image + 1) / 2).requires_grad_(True)
    out = colour_jitter(x, 0.3, g)
    assert out.min() >= 0 and out.max() <= 1
    out.sum().backward()
    assert (x.grad != 0).all()  # every pixel, the saturated red ones included
    # the method's augmentation: in [-1, 1] out, the uncovered corners get the background's colour
    method = VQGANCLIP.__new__(VQGANCLIP)
    torch.nn.Module.__init__(method)
    method.affine_degrees, method.affine_translate, method.jitter = 20.0, 0.2, 0.0
    background = torch.tensor([40 / 255] * 3)
    assert torch.allclose(torch.tensor(border_colour((image + 1) / 2)), background, atol=1e-6)
    for seed in range(4):
        cut = method.augment((image + 1) / 2, torch.Generator().manual_seed(seed)) * 2 - 1
        assert cut.min() >= -1 and cut.max() <= 1
        corners = torch.stack([cut[:, 0, 0], cut[:, 0, -1], cut[:, -1, 0], cut[:, -1, -1]])
        assert torch.allclose(corners, background * 2 - 1, atol=0.02), corners  # never mid-grey (0)


# ----------------------------------------------------------------------------- CLIP + GAN


@pytest.fixture(scope="module")
def tiny_stylegan(tmp_path_factory):
    """A tiny 16 px text-conditional StyleGAN, barely trained on the block images."""
    from conftest import block_images, fit_and_save
    from torch.utils.data import DataLoader

    from lightning_modules.gan import TextToImageGAN
    from networks.stackgan import MatchingAwareDiscriminator
    from networks.stylegan import StyleGenerator
    from networks.text_encoders import TransformerTextEncoder

    torch.manual_seed(0)
    g = StyleGenerator(text_dim=32, image_size=16, z_dim=12, w_dim=16, channels=16, mapping_layers=1,
                       attention_resolutions=(8,), heads=2, hierarchical=True)  # fmt: skip
    gan = TextToImageGAN(g, [MatchingAwareDiscriminator(32, image_size=16, channels=8, cond_dim=8, norm="none")],
                         TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte"), loss="hinge")  # fmt: skip
    with torch.no_grad():  # styles and noise that matter, as after training
        for name, p in g.named_parameters():
            if "affine.weight" in name or "noise_strength" in name or "block_latent" in name:
                p.normal_(0, 0.5)
    loader = DataLoader([{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * 2, batch_size=None)
    return fit_and_save(gan, loader, 4, str(tmp_path_factory.mktemp("stylegan") / "stylegan.ckpt"))


@pytest.mark.parametrize("which", ["stackgan", pytest.param("stylegan", marks=pytest.mark.slow)])  # w-space: slow tests
def test_clip_guidance_of_a_gan_lowers_the_clip_loss_and_a_seed_repeats_the_image(which, checkpoints, tiny_stylegan):
    from lightning_modules.clip_guided import GANCLIP

    path = checkpoints["gan"] if which == "stackgan" else tiny_stylegan
    model = GANCLIP(path, checkpoints["clip"], steps=25, lr=0.1, cutouts=4)
    assert model.latent == ("z" if which == "stackgan" else "w")
    prompts = BLOCK_CAPTIONS[:2]
    images = model.generate(prompts, seed=[1, 2])
    curve = model.last_loss_curve
    assert images.shape == (2, 3, 16, 16) and curve.shape == (25, 2)
    start = model.generate(prompts, seed=[1, 2], steps=0)
    with torch.no_grad():
        text = model.clip.encode_text(prompts)
        before, after = (spherical_distance(model.clip.encode_image(x), text) for x in (start, images))
    assert (after < before - 0.01).all(), (before, after)
    assert torch.equal(model.generate(prompts, seed=[1, 2]), images)
    alone = model.generate(prompts[1:2], seed=[2])
    assert torch.allclose(alone[0], images[1], atol=1e-4)
    assert not torch.equal(model.generate(prompts, seed=[1, 3])[1], images[1])


def test_clip_plus_gan_refuses_a_method_that_is_not_a_gan_and_a_w_it_does_not_have(checkpoints):
    from lightning_modules.clip_guided import GANCLIP

    with pytest.raises(ConfigError, match="not a one-stage GAN's checkpoint"):
        GANCLIP(checkpoints["cvae"], checkpoints["clip"])
    with pytest.raises(ConfigError, match="'w' for a generator with a mapping network"):
        GANCLIP(checkpoints["gan"], checkpoints["clip"], latent="w")
