"""The evaluation metrics: FID/KID with a pluggable extractor against the closed form, the
small-sample warning, CLIP score, AttnGAN's R-precision at its ceiling and at chance, diversity."""

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from evaluation.metrics import (
    CLIPImageFeatures,
    clip_score,
    diversity,
    embedding_diversity,
    fid_kid,
    r_precision,
)
from networks.errors import MissingFileError


class Pooled(nn.Module):
    """A fixed feature extractor: 4 x 4 average pooling of [0, 1] images, 48 features."""

    num_features = 48

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def _images(n, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 1.2 - 0.6 + shift).clamp(-1, 1)


def _frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_with_a_custom_extractor_matches_the_closed_form_and_names_the_extractor():
    real, fake = _images(200), _images(200, shift=0.3, seed=1)
    out = fid_kid(real, fake, Pooled(), "pooled", kid_subset=50)
    assert set(out) == {"fid_pooled", "kid_pooled", "kid_pooled_std", "fid_pooled_n"} and out["fid_pooled_n"] == 200
    assert out["kid_pooled_std"] > 0  # the spread over KID's random subsets, kept
    feats = [Pooled()((x + 1) / 2).double().numpy() for x in (real, fake)]
    assert out["fid_pooled"] == pytest.approx(_frechet(*feats), rel=1e-3)
    same = fid_kid(real, _images(200, seed=2), Pooled(), "pooled")
    assert same["fid_pooled"] < out["fid_pooled"] / 10 and same["kid_pooled"] < out["kid_pooled"]


def test_fewer_samples_than_features_warn_instead_of_a_silent_nan(tmp_path):
    with pytest.warns(UserWarning, match="fid_pooled on 40 samples per set, not more than the 48 feature"):
        fid_kid(_images(40), _images(40, seed=1), Pooled(), "pooled", kid_subset=20)
    with pytest.raises(MissingFileError, match="pt_inception-2015-12-05.*local path"):
        fid_kid(_images(4), _images(4), None, "inception", inception_weights=str(tmp_path / "none.pth"))


class TableCLIP(nn.Module):
    """A fake CLIP: each prompt has a fixed random unit vector; an image's embedding is the vector
    of the prompt its first pixel indexes (a perfect CLIP), or noise."""

    def __init__(self, pool, perfect=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = {p: v for p, v in zip(pool, nn.functional.normalize(torch.randn(len(pool), 16, generator=g), dim=-1))}
        self.pool, self.perfect, self.image_size = pool, perfect, None

    def encode_text(self, prompts):
        return torch.stack([self.table[p] for p in prompts])

    def encode_image(self, images):
        if not self.perfect:
            return nn.functional.normalize(torch.randn(len(images), 16, generator=torch.Generator().manual_seed(1)), dim=-1)
        return torch.stack([self.table[self.pool[int(i)]] for i in images[:, 0, 0, 0]])


def test_r_precision_is_one_for_a_perfect_clip_and_chance_for_noise():
    pool = [f"prompt {i}" for i in range(300)]
    images = torch.arange(200).float().view(200, 1, 1, 1).expand(200, 3, 2, 2)
    assert r_precision(TableCLIP(pool), images, pool[:200], pool, distractors=99) == (1.0, pytest.approx(0.025 ** (1 / 200)), 1.0)  # every hit: the exact bound
    mean, _, _ = r_precision(TableCLIP(pool, perfect=False), images, pool[:200], pool, distractors=99)
    assert mean < 0.05  # chance is 1 / 100
    assert clip_score(TableCLIP(pool), images[:5], pool[:5]) == pytest.approx(100.0)
    features = CLIPImageFeatures(TableCLIP(pool))
    assert features.num_features == 16


def test_diversity_is_zero_for_one_image_per_prompt_and_names_its_distance():
    same = _images(3).unsqueeze(1).expand(3, 4, 3, 16, 16)
    assert diversity(same) == (0.0, "pixel_l1")
    varied = torch.stack([_images(4, seed=s) for s in range(3)])
    value, name = diversity(varied)
    assert value > 0.1 and name == "pixel_l1"
    assert diversity(varied, lpips=lambda x, y: (x - y).pow(2).mean((1, 2, 3)))[1] == "lpips"


class MeanColourCLIP(nn.Module):
    """An image embedding that sees only the mean colour (unit length): blind to where things are."""

    def encode_image(self, images):
        return nn.functional.normalize(images.float().mean((2, 3)) + 2.0, dim=-1)


def test_embedding_diversity_is_the_mean_pairwise_cosine_distance_and_ignores_what_the_judge_ignores():
    clip = MeanColourCLIP()
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    images = colours[:, :, None, None].expand(3, 3, 8, 8)  # one prompt, three seeds: red, green, blue
    e = clip.encode_image(images)
    by_hand = np.mean([1 - float(e[i] @ e[j]) for i in range(3) for j in range(3) if i != j])
    spread = embedding_diversity(clip, images[None])
    assert spread.shape == (1,) and spread[0] == pytest.approx(by_hand, abs=1e-6) and spread[0] > 0.05
    pixels = torch.zeros(1, 3, 3, 8, 8)
    pixels[0, :, :, :, :4] = 1.0
    pixels = torch.stack([torch.roll(pixels[0, 0], 2 * k, dims=-1) for k in range(3)])[None]
    assert embedding_diversity(clip, pixels)[0] == pytest.approx(0.0, abs=1e-6)  # same colours, other places
    assert diversity(pixels)[0] > 0.1  # while the pixel distance sees the shift
    with pytest.raises(ValueError, match="two seeds"):
        embedding_diversity(clip, images[None, :1])


def test_fid_inception_reads_its_weights_from_a_local_file(tmp_path, monkeypatch):
    """torchmetrics' Inception (torch-fidelity's) from a local file; the file is made here from a
    randomly initialised network, so nothing is downloaded and the plumbing is what is tested."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda self, state, *a, **k: None)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    with pytest.warns(UserWarning, match="not more than the 2048 feature dimensions"):
        out = fid_kid(_images(6), _images(6, shift=0.3, seed=1), None, "inception",
                      inception_weights=str(tmp_path / "pt_inception.pth"), kid_subset=3)  # fmt: skip
    assert set(out) == {"fid_inception", "kid_inception", "kid_inception_std", "fid_inception_n"} and all(np.isfinite(v) for v in out.values())


def test_clip_score_clamps_the_mean_as_torchmetrics_does_not_each_pair():
    class Fixed(nn.Module):
        def encode_image(self, images):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0]])

        def encode_text(self, prompts):
            return torch.tensor([[0.5, 0.75**0.5], [-0.3, 0.91**0.5]])

    assert clip_score(Fixed(), torch.zeros(2, 3, 2, 2), ["a", "b"]) == pytest.approx(100 * (0.5 - 0.3) / 2)


class _Identity(nn.Module):
    num_features = 48

    def forward(self, x):
        return x


def test_our_frechet_distance_is_torchmetrics_fid_and_its_bootstrap_interval_separates_a_real_gap():
    from evaluation.metrics import fid_interval, frechet_distance

    real, same, shifted = _images(300), _images(300, seed=1), _images(300, shift=0.15, seed=2)
    from torchmetrics.image.fid import FrechetInceptionDistance

    out = fid_kid(real, shifted, Pooled(), "pooled", bootstrap=40)
    features = [Pooled()((x + 1) / 2).double() for x in (real, same, shifted)]
    reference = FrechetInceptionDistance(feature=_Identity(), normalize=True)  # the reference implementation
    reference.update(features[0], real=True)
    reference.update(features[2], real=False)
    assert out["fid_pooled"] == pytest.approx(float(reference.compute()), rel=1e-6)
    assert frechet_distance(features[0], features[2]) == pytest.approx(_frechet(*(f.numpy() for f in features[::2])), rel=1e-6)
    assert out["fid_pooled_low"] <= out["fid_pooled"] <= out["fid_pooled_high"]
    same_low, same_high = fid_interval(features[0], features[1], rounds=40)
    assert same_high < out["fid_pooled_low"]  # a real gap: the intervals do not overlap


def test_fid_infinity_removes_most_of_the_small_sample_bias():
    from evaluation.metrics import fid_infinity, frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(400, 16, generator=g, dtype=torch.float64)  # the same distribution: the true FID is 0
    biased = frechet_distance(real, fake)
    assert biased > 0.2 and abs(fid_infinity(real, fake, repeats=5)) < biased / 3


def _renders(dataset: str) -> torch.Tensor:
    if dataset == "openmoji":
        from evaluation import openmoji_protocol as OM

        return torch.stack([OM.render_design(d, 32) for d in list(OM.designs().values())[::150]])
    from datamodules.shapes import objects_for, prompt_set, render

    rng = np.random.default_rng(0)
    renders = []
    for name in ("single", "two_objects", "counting"):
        for _, scene in prompt_set(name, n=8, part="any"):
            image = np.asarray(render(objects_for(scene, rng), 32), dtype=np.float32) / 127.5 - 1
            renders.append(torch.from_numpy(image).permute(2, 0, 1))
    return torch.stack(renders)


@pytest.mark.parametrize("dataset", ["shapes", "openmoji"])
def test_sharpness_falls_monotonically_with_blur_on_renders_and_rises_with_noise(dataset):
    """Sharpness: the renders' own high-frequency energy is 1; a Gaussian blur of growing width
    lowers it step by step; added noise raises it (flat shapes and OpenMoji's designs)."""
    from torchvision.transforms.functional import gaussian_blur

    from evaluation.metrics import sharpness

    renders = _renders(dataset)
    assert sharpness(renders, renders) == pytest.approx(1.0)
    values = [sharpness(gaussian_blur(renders, 9, sigma), renders) for sigma in (0.5, 0.75, 1.0, 1.5, 2.0)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[0] < 1.0 and values[-1] < 0.1, values
    noisy = (renders + 0.1 * torch.randn(renders.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert sharpness(noisy, renders) > 1.0
