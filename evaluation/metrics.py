"""FID (the Frechet distance, checked against torchmetrics') and KID (torchmetrics) with a
pluggable feature extractor, CLIP score and AttnGAN's
R-precision with an injected CLIP, and diversity across seeds.

Images are ``(n, 3, h, w)`` in [-1, 1], as ``generate`` returns them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from evaluation.intervals import bootstrap_interval
from networks.errors import MissingFileError


class CLIPImageFeatures(nn.Module):
    """The image tower of a CLIP as a feature extractor for FID and KID: images in
    [0, 1] (``normalize=True``) -> the l2-normalised CLIP embedding."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        size = getattr(clip, "image_size", None) or 32
        with torch.no_grad():
            self.num_features = int(clip.encode_image(torch.zeros(1, 3, size, size)).shape[-1])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images.float() * 2 - 1)  # a CLIP resizes to its own input


class TowerFeatures(nn.Module):
    """An image tower that takes [-1, 1] (e.g. ``OpenCLIPImageTower``: an open_clip model from a
    local file) as a feature extractor: images in [0, 1] -> its l2-normalised embedding."""

    def __init__(self, tower: nn.Module, size: int = 32):
        super().__init__()
        self.tower = tower.eval()
        with torch.no_grad():
            self.num_features = int(tower(torch.zeros(1, 3, size, size)).shape[-1])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return torch.nn.functional.normalize(self.tower(images.float() * 2 - 1), dim=-1)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (torch-fidelity's ``inception-v3-compat``, the standard
    ``pt_inception-2015-12-05`` weights) from a local file: images in [0, 1] -> 2048 features."""

    num_features = 2048

    def __init__(self, weights: str | None):
        super().__init__()
        if not weights or not os.path.isfile(weights):
            raise MissingFileError(
                f"Inception weights {weights!r} not found: FID with Inception needs the standard "
                "pt_inception-2015-12-05-6726825d.pth file, given by its local path (nothing is downloaded)"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights)  # fmt: skip

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8))


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets ``(n, d)``: ``|mu_r - mu_f|^2 + tr(C_r + C_f - 2 (C_r C_f)^1/2)``,
    the trace of the root from the eigenvalues of ``C_r C_f`` (as torchmetrics computes it)."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    c_r, c_f = torch.cov(real.T), torch.cov(fake.T)
    root = torch.linalg.eigvals(c_r @ c_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + c_r.trace() + c_f.trace() - 2 * root)


def fid_interval(real: Tensor, fake: Tensor, rounds: int = 50, seed: int = 0, point: float | None = None
                 ) -> tuple[float, float]:  # fmt: skip
    """A bootstrap 95% interval of FID over images: both feature sets resampled with replacement
    ``rounds`` times. Resampling repeats images, which raises FID (fewer distinct images), so the
    bootstrap values are shifted back by their mean excess over the point value before their
    2.5 and 97.5 percentiles are read. ``point``: the FID of the two sets, when it is known."""
    g = torch.Generator().manual_seed(seed)
    values = [
        frechet_distance(real[torch.randint(len(real), (len(real),), generator=g)],
                         fake[torch.randint(len(fake), (len(fake),), generator=g)])
        for _ in range(rounds)
    ]  # fmt: skip
    bias = float(np.mean(values)) - (frechet_distance(real, fake) if point is None else point)
    low, high = np.percentile(values, [2.5, 97.5]) - bias
    return float(low), float(high)


def fid_infinity(real: Tensor, fake: Tensor, points: int = 5, repeats: int = 3, seed: int = 0) -> float:
    """FID extrapolated to infinitely many generated images (Chong and Forsyth, "Effectively
    Unbiased FID and Inception Score and where to find them"): FID is linear in 1/N, so FID at
    ``points`` sizes from N/2 to N (each the mean of ``repeats`` random subsets) is fitted by a
    line in 1/N and read at 1/N = 0. Only the generated set is subsampled: the bias that a real
    set of N images adds stays (give more real images to shrink it)."""
    g = torch.Generator().manual_seed(seed)
    sizes = np.linspace(len(fake) // 2, len(fake), points).astype(int)
    values = [np.mean([frechet_distance(real, fake[torch.randperm(len(fake), generator=g)[:n]]) for _ in range(repeats)])
              for n in sizes]  # fmt: skip
    slope, intercept = np.polyfit(1.0 / sizes, values, 1)
    return float(intercept)


def fid_kid(real: Tensor | None, fake: Tensor, extractor: nn.Module | None, name: str,
            inception_weights: str | None = None, kid_subset: int = 50, real_features: Tensor | None = None,
            bootstrap: int = 0, infinity: bool = False) -> dict[str, float]:  # fmt: skip
    """``{"fid_<name>", "kid_<name>", "kid_<name>_std", "fid_<name>_n"}`` (the std of KID over its
    random subsets, and N, the images per set) of two image sets under one feature extractor
    (an ``nn.Module`` taking images in [0, 1], or None for Inception from ``inception_weights``);
    ``real_features`` (``image_features`` of the real set) replaces ``real`` when they are cached.
    ``bootstrap`` rounds add FID's 95% interval over images (``fid_<name>_low``, ``_high``);
    ``infinity`` adds ``fid_inf_<name>`` (``fid_infinity``).
    Below the feature dimension FID's covariance is singular: a warning says so (and the number is
    still given, marked by the warning), instead of a NaN."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real_features if real_features is not None else real), len(fake))
    if extractor is None:
        extractor = InceptionFeatures(inception_weights)
    dim = int(getattr(extractor, "num_features", 0))
    if dim and n <= dim:
        warnings.warn(
            f"fid_{name} on {n} samples per set, not more than the {dim} feature dimensions: the covariance "
            "is singular and FID unreliable; use more samples, or compare KID",
            stacklevel=2,
        )
    # the extractor runs once per image; KID reads the features through an identity
    features = {"real": real_features if real_features is not None else image_features(extractor, real),
                "fake": image_features(extractor, fake)}  # fmt: skip
    passthrough = _Features(features["real"].shape[-1])
    kid = KernelInceptionDistance(feature=passthrough, normalize=True, subset_size=min(kid_subset, n))
    kid.update(features["real"].double(), real=True)
    kid.update(features["fake"], real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws random subsets: the same for the same images
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    fid = frechet_distance(features["real"], features["fake"])  # torchmetrics' FID formula (tested against it)
    out = {f"fid_{name}": fid, f"kid_{name}": float(kid_mean), f"kid_{name}_std": float(kid_std), f"fid_{name}_n": n}
    if bootstrap:
        out[f"fid_{name}_low"], out[f"fid_{name}_high"] = fid_interval(
            features["real"], features["fake"], bootstrap, point=fid
        )
    if infinity:
        out[f"fid_inf_{name}"] = fid_infinity(features["real"], features["fake"])
    return out


class _Features(nn.Module):
    """An identity for torchmetrics' KID fed with features computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def image_features(extractor: nn.Module, images: Tensor, batch: int = 64) -> Tensor:
    """Features of images in [-1, 1], in batches (the extractor takes [0, 1])."""
    return torch.cat(
        [extractor((images[i : i + batch].float() + 1) / 2).double() for i in range(0, len(images), batch)]
    )


@torch.no_grad()
def clip_score(clip: nn.Module, images: Tensor, prompts: list[str]) -> float:
    """``max(100 * mean cos(image, prompt), 0)``: torchmetrics' CLIPScore convention, which clamps
    the mean, not each pair."""
    cos = (clip.encode_image(images) * clip.encode_text(list(prompts))).sum(-1)
    return float((100 * cos.mean()).clamp(min=0))


@torch.no_grad()
def r_precision_hits(clip: nn.Module, images: Tensor, prompts: list[str], pool: list[str], distractors: int = 99,
                     generator: torch.Generator | None = None,
                     same: Callable[[str, str], bool] | None = None) -> list[float]:  # fmt: skip
    """For each image, whether its true prompt is more similar than every one of ``distractors``
    others drawn from ``pool`` without replacement (all others when the pool is smaller): 1 when
    it beats them all, ``1 / (k + 1)`` when it ties with ``k`` of them at the top, else 0. A
    distractor is never the true prompt, nor a caption that ``same(prompt, caption)`` says is true
    of the same images (the two objects of "A and B" in the other order)."""
    image = clip.encode_image(images)
    candidates = []  # per image: its prompt, then its distractors
    for prompt in prompts:
        others = sorted({p for p in pool if p != prompt and not (same and same(prompt, p))})
        picks = torch.randperm(len(others), generator=generator)[:distractors].tolist()
        candidates.append([prompt] + [others[j] for j in picks])
    unique = sorted({t for c in candidates for t in c})  # each caption encoded once, not once per image
    row = {t: i for i, t in enumerate(unique)}
    texts = torch.cat([clip.encode_text(unique[i : i + 256]) for i in range(0, len(unique), 256)])
    hits = []
    for i, names in enumerate(candidates):
        sims = texts[[row[t] for t in names]] @ image[i]
        beaten, tied = bool((sims[1:] > sims[0]).any()), int((sims[1:] == sims[0]).sum())
        hits.append(0.0 if beaten else 1.0 / (tied + 1))
    return hits


def r_precision(clip: nn.Module, images: Tensor, prompts: list[str], pool: list[str], distractors: int = 99,
                seeds: int = 1, seed: int = 0, same: Callable[[str, str], bool] | None = None,
                ) -> tuple[float, float, float]:  # fmt: skip
    """AttnGAN's R-precision (R@1): the rate at which an image's true prompt beats ``distractors``
    others from ``pool`` (``r_precision_hits``), with its prompt-level bootstrap 95% interval:
    ``(mean, low, high)``. The images come ``seeds`` per prompt, one prompt after another."""
    hits = r_precision_hits(clip, images, prompts, pool, distractors, torch.Generator().manual_seed(seed), same)
    return bootstrap_interval(np.asarray(hits).reshape(-1, seeds), seed=seed)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@torch.no_grad()
def high_frequency_energy(images: Tensor) -> Tensor:
    """Per image ``(b, 3, h, w)`` in [-1, 1]: the mean squared response of a 3 x 3 Laplacian on the
    luminance (Rec. 601 weights) on a [0, 1] scale, over the interior pixels: the energy of the
    finest detail, which blur removes first."""
    x = (images.float() + 1) / 2
    luminance = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    response = torch.nn.functional.conv2d(luminance, LAPLACIAN.to(x.device)[None, None])
    return response.square().mean((1, 2, 3))


def sharpness(images: Tensor, reference: Tensor) -> float:
    """High-frequency energy of generated images relative to real ones of the same prompts: 1 as
    sharp as the renders, below 1 blurrier (on shapes renders a Gaussian blur of sigma 0.5 px gives
    0.46, of 1 px 0.08, a 2x down- and up-sampling 0.05),
    above 1 noisier or with more edges than asked for."""
    return float(high_frequency_energy(images).mean() / high_frequency_energy(reference).mean().clamp_min(1e-12))


@torch.no_grad()
def diversity(images: Tensor, lpips: nn.Module | None = None) -> tuple[float, str]:
    """Mean pairwise distance between the seeds' images of each prompt, averaged over prompts:
    ``images`` is ``(prompts, seeds, 3, h, w)``. LPIPS when a network is given, else the mean
    absolute pixel difference on a [0, 1] scale; the name of the distance comes back with it."""
    p, s = images.shape[:2]
    if s < 2:
        raise ValueError("diversity needs at least two seeds per prompt")
    pairs = [(i, j) for i in range(s) for j in range(i + 1, s)]
    total = 0.0
    for a, b in pairs:
        x, y = images[:, a].float(), images[:, b].float()
        if lpips is not None:
            total += float(lpips(x, y).mean())
        else:
            total += float(((x - y).abs() / 2).mean())
    return total / len(pairs), "lpips" if lpips is not None else "pixel_l1"


@torch.no_grad()
def embedding_diversity(clip: nn.Module, images: Tensor) -> np.ndarray:
    """Per prompt, the mean pairwise cosine distance ``1 - cos`` between the CLIP image embeddings
    of its seeds' images: ``images`` is ``(prompts, seeds, 3, h, w)``. Unlike pixel distance it
    does not grow with noise the judge ignores, nor with a shift of the same content."""
    p, s = images.shape[:2]
    if s < 2:
        raise ValueError("diversity needs at least two seeds per prompt")
    e = clip.encode_image(images.flatten(0, 1)).float().reshape(p, s, -1)
    cos = e @ e.transpose(1, 2)  # (p, s, s)
    off = ~torch.eye(s, dtype=torch.bool)
    return (1 - cos[:, off]).mean(1).double().numpy()
