"""StackGAN and StackGAN++ networks: conditioning augmentation, the stage-I generator, the
stage-II refiner, the StackGAN++ tree of generators and the matching-aware discriminator.

Every generator returns a :class:`GeneratorOutput` whose ``images`` run from the lowest to
the highest resolution (one image for StackGAN stages, one per scale for StackGAN++) and
whose ``mu`` / ``logvar`` are those of the conditioning augmentation (for its KL term).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import Generators, randn


class GeneratorOutput(NamedTuple):
    images: list[Tensor]  # (b, 3, s, s) in [-1, 1], lowest resolution first
    mu: Tensor | None  # (b, cond_dim); None for a generator without conditioning augmentation
    logvar: Tensor | None  # (b, cond_dim)


class ConditioningAugmentation(nn.Module):
    """A Gaussian ``N(mu(e), diag(exp(logvar(e))))`` over conditioning codes, computed from the
    sentence embedding ``e`` and sampled with the reparameterisation trick (StackGAN, sec. 3.1).

    ``kl(mu, logvar)`` is the KL divergence to ``N(0, I)`` averaged over code dimensions and the
    batch, the regulariser that keeps the conditioning manifold smooth.
    """

    def __init__(self, text_dim: int, cond_dim: int = 128):
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(text_dim, 2 * cond_dim)

    def forward(self, sentence: Tensor, generator: Generators = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.fc(sentence).chunk(2, dim=1)
        eps = randn(mu.shape, generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar), mu, logvar

    @staticmethod
    def kl(mu: Tensor, logvar: Tensor) -> Tensor:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def _log2_steps(high: int, low: int, what: str) -> int:
    steps = math.log2(high / low)
    if high < low or steps != int(steps):
        raise ValueError(f"{what}: {high} must be {low} times a power of two")
    return int(steps)


class UpBlock(nn.Sequential):
    """Nearest 2x upsampling, 3x3 convolution, batch norm, GLU (StackGAN++)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(cin, 2 * cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * cout),
            nn.GLU(dim=1),
        )


class ModulatedUpBlock(nn.Module):
    """An :class:`UpBlock` whose batch norm takes its scale and shift from the conditioning code
    (conditional batch norm, as DF-GAN's text-conditioned affine layers): the text steers every
    resolution, not only the 4x4 input. Starts as a plain ``UpBlock`` (zero-initialised affine)."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, 2 * cout, 3, padding=1, bias=False)
        )
        self.norm = nn.BatchNorm2d(2 * cout, affine=False)
        self.affine = nn.Linear(cond_dim, 4 * cout)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        gamma, beta = self.affine(c)[:, :, None, None].chunk(2, dim=1)
        return F.glu(self.norm(self.conv(x)) * (1 + gamma) + beta, dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.GLU(dim=1),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _to_rgb(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1), nn.Tanh())


def tree_widths(first: int, num_stages: int) -> list[int]:
    """Channels of each stage of a tree of generators: ``first``, halved per stage (at least 16)."""
    width = [first]
    for _ in range(num_stages - 1):
        width.append(max(width[-1] // 2, 16))
    return width


def _channels(base: int, level: int, minimum: int = 16) -> int:
    return max(base // 2**level, minimum)


class _Stem(nn.Module):
    """(noise, conditioning code) -> a 4x4 feature map upsampled to ``size``; returns the
    feature map and its channel count. With ``modulated`` every upsampling block is a
    :class:`ModulatedUpBlock`."""

    def __init__(self, z_dim: int, cond_dim: int, channels: int, size: int, modulated: bool = False):
        super().__init__()
        self.channels, self.modulated = channels, modulated
        self.fc = nn.Sequential(
            nn.Linear(z_dim + cond_dim, 2 * channels * 16, bias=False),
            nn.BatchNorm1d(2 * channels * 16),
            nn.GLU(dim=1),
        )
        ups = _log2_steps(size, 4, "stage-I image size")
        widths = [(_channels(channels, i), _channels(channels, i + 1)) for i in range(ups)]
        self.ups = nn.ModuleList(
            ModulatedUpBlock(cin, cout, cond_dim) if modulated else UpBlock(cin, cout) for cin, cout in widths
        )
        self.out_channels = _channels(channels, ups)

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], self.channels, 4, 4)
        for up in self.ups:
            h = up(h, c) if self.modulated else up(h)
        return h


class StageIGenerator(nn.Module):
    """StackGAN stage I: sentence -> conditioning augmentation -> with noise -> a low-resolution image.

    Args:
        text_dim: the text encoder's pooled dimension.
        image_size: output side (4 times a power of two: 16, 32, 64).
        z_dim: noise dimension.
        cond_dim: conditioning-augmentation code dimension.
        channels: channels of the 4x4 map, halved at each upsampling (at least 16).
        modulated: the conditioning code also sets the batch-norm scale and shift of every
            upsampling block (:class:`ModulatedUpBlock`); StackGAN feeds it only at the input.
    """

    def __init__(
        self,
        text_dim: int,
        image_size: int = 16,
        z_dim: int = 100,
        cond_dim: int = 128,
        channels: int = 256,
        modulated: bool = False,
    ):
        super().__init__()
        self.z_dim, self.image_size = z_dim, image_size
        self.ca = ConditioningAugmentation(text_dim, cond_dim)
        self.stem = _Stem(z_dim, cond_dim, channels, image_size, modulated)
        self.to_rgb = _to_rgb(self.stem.out_channels)

    def forward(self, z: Tensor, sentence: Tensor, generator: Generators = None) -> GeneratorOutput:
        c, mu, logvar = self.ca(sentence, generator)
        return GeneratorOutput([self.to_rgb(self.stem(z, c))], mu, logvar)


class _Refine(nn.Module):
    """Joins a feature map with the conditioning code (replicated spatially), residual blocks,
    then a 2x upsampling (StackGAN++ ``NEXT_STAGE_G``)."""

    def __init__(self, cin: int, cond_dim: int, cout: int, num_res_blocks: int):
        super().__init__()
        self.joint = nn.Sequential(
            nn.Conv2d(cin + cond_dim, 2 * cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * cin),
            nn.GLU(dim=1),
        )
        self.res = nn.Sequential(*(ResBlock(cin) for _ in range(num_res_blocks)))
        self.up = UpBlock(cin, cout)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        c = c[:, :, None, None].expand(-1, -1, *h.shape[-2:])
        return self.up(self.res(self.joint(torch.cat([h, c], dim=1))))


class StageIIGenerator(nn.Module):
    """StackGAN stage II: a low-resolution image and the sentence -> a refined image ``factor`` times larger.

    The image is encoded down ``down`` times, joined with its own conditioning-augmentation
    code, passed through residual blocks and upsampled ``down + log2(factor)`` times.

    Args:
        text_dim: the text encoder's pooled dimension.
        low_res_size: side of the stage-I image.
        factor: 2 or 4 (the paper: 64 -> 256).
        cond_dim: conditioning-augmentation code dimension.
        channels: channels after the encoder (halved at each upsampling, at least 16).
        down: encoder downsamplings.
        num_res_blocks: residual blocks after the join.
    """

    def __init__(
        self,
        text_dim: int,
        low_res_size: int = 16,
        factor: Literal[2, 4] = 2,
        cond_dim: int = 128,
        channels: int = 128,
        down: int = 1,
        num_res_blocks: int = 2,
    ):
        super().__init__()
        self.low_res_size, self.image_size = low_res_size, low_res_size * factor
        self.ca = ConditioningAugmentation(text_dim, cond_dim)
        layers: list[nn.Module] = [
            nn.Conv2d(3, _channels(channels, down), 3, padding=1),
            nn.ReLU(inplace=True),
        ]
        for i in range(down, 0, -1):
            layers += [
                nn.Conv2d(
                    _channels(channels, i), _channels(channels, i - 1), 4, stride=2, padding=1, bias=False
                ),
                nn.BatchNorm2d(_channels(channels, i - 1)),
                nn.ReLU(inplace=True),
            ]
        self.encode = nn.Sequential(*layers)
        ups = down + _log2_steps(factor, 1, "stage-II factor")
        self.refine = _Refine(channels, cond_dim, _channels(channels, 1), num_res_blocks)
        self.ups = nn.Sequential(
            *(UpBlock(_channels(channels, i), _channels(channels, i + 1)) for i in range(1, ups))
        )
        self.to_rgb = _to_rgb(_channels(channels, ups))

    def forward(self, low_res: Tensor, sentence: Tensor, generator: Generators = None) -> GeneratorOutput:
        if low_res.shape[-1] != self.low_res_size:
            raise ValueError(
                f"stage II expects {self.low_res_size} px stage-I images, got {low_res.shape[-1]} px"
            )
        c, mu, logvar = self.ca(sentence, generator)
        h = self.ups(self.refine(self.encode(low_res), c))
        return GeneratorOutput([self.to_rgb(h)], mu, logvar)


class TreeGenerator(nn.Module):
    """StackGAN++: one conditioning code drives a tree of generators; branch ``i`` draws an image
    of side ``base_size * 2**i`` from the shared hidden features, and all are trained jointly.

    Args:
        text_dim: the text encoder's pooled dimension.
        base_size: side of the first (lowest) scale.
        num_stages: number of scales (3 in the paper: 64, 128, 256).
        z_dim, cond_dim, channels: as in :class:`StageIGenerator`.
        num_res_blocks: residual blocks in each refining stage.
        modulated: as in :class:`StageIGenerator`, for the shared stem.
    """

    def __init__(
        self,
        text_dim: int,
        base_size: int = 16,
        num_stages: int = 3,
        z_dim: int = 100,
        cond_dim: int = 128,
        channels: int = 256,
        num_res_blocks: int = 2,
        modulated: bool = False,
    ):
        super().__init__()
        self.z_dim, self.image_size = z_dim, base_size * 2 ** (num_stages - 1)
        self.ca = ConditioningAugmentation(text_dim, cond_dim)
        self.stem = _Stem(z_dim, cond_dim, channels, base_size, modulated)
        width = tree_widths(self.stem.out_channels, num_stages)
        self.stages = nn.ModuleList(
            _Refine(width[i], cond_dim, width[i + 1], num_res_blocks) for i in range(num_stages - 1)
        )
        self.to_rgb = nn.ModuleList(_to_rgb(w) for w in width)

    def forward(self, z: Tensor, sentence: Tensor, generator: Generators = None) -> GeneratorOutput:
        c, mu, logvar = self.ca(sentence, generator)
        h = self.stem(z, c)
        images = [self.to_rgb[0](h)]
        for stage, to_rgb in zip(self.stages, self.to_rgb[1:]):
            h = stage(h, c)
            images.append(to_rgb(h))
        return GeneratorOutput(images, mu, logvar)


class MatchingAwareDiscriminator(nn.Module):
    """Image (+ sentence) -> logits. The image is encoded down to 4x4; the conditional head joins
    it with a projection of the sentence (replicated spatially) and scores whether the image is
    real *and* matches the text; the unconditional head scores realism alone (StackGAN++).

    Args:
        text_dim: the text encoder's pooled dimension.
        image_size: input side (4 times a power of two).
        channels: channels after the first convolution, doubled per downsampling (at most 8x).
        cond_dim: dimension of the sentence projection.
        norm: ``batch`` (StackGAN) or ``none`` (DF-GAN; better with the gradient penalty).

    ``forward`` returns ``(conditional, unconditional)`` logits, each of shape ``(b,)``; it is
    ``heads(features(image), sentence)``, split so that one encoding of the real images serves
    both their matching and their mismatched captions.
    """

    def __init__(
        self,
        text_dim: int,
        image_size: int = 16,
        channels: int = 64,
        cond_dim: int = 128,
        norm: Literal["batch", "none"] = "batch",
    ):
        super().__init__()
        self.image_size = image_size
        downs = _log2_steps(image_size, 4, "discriminator image size")
        if downs < 1:
            raise ValueError("the discriminator needs images of at least 8 px")

        def normed(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()

        layers: list[nn.Module] = [
            nn.Conv2d(3, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        c = channels
        for _ in range(downs - 1):
            c_next = min(2 * c, 8 * channels)
            layers += [
                nn.Conv2d(c, c_next, 4, stride=2, padding=1, bias=False),
                normed(c_next),
                nn.LeakyReLU(0.2, True),
            ]
            c = c_next
        self.encode = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(text_dim, cond_dim), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(
            nn.Conv2d(c + cond_dim, c, 3, padding=1, bias=False), normed(c), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c, 1, 4),
        )  # fmt: skip
        self.uncond = nn.Conv2d(c, 1, 4)

    def features(self, image: Tensor) -> Tensor:
        """The image encoded to a 4x4 map, which ``heads`` scores against any sentence."""
        return self.encode(image)

    def heads(self, h: Tensor, sentence: Tensor) -> tuple[Tensor, Tensor]:
        s = self.project(sentence)[:, :, None, None].expand(-1, -1, *h.shape[-2:])
        return self.joint(torch.cat([h, s], dim=1)).flatten(), self.uncond(h).flatten()

    def forward(self, image: Tensor, sentence: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.features(image), sentence)


def colour_consistency(
    low: Tensor, high: Tensor, mean_weight: float = 1.0, cov_weight: float = 5.0
) -> Tensor:
    """StackGAN++'s colour-consistency term between two scales of the same sample: squared
    distances of the per-image pixel means and of the 3x3 colour covariances."""

    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        pixels = x.float().flatten(2)  # (b, 3, n)
        mu = pixels.mean(2)
        centred = pixels - mu[..., None]
        return mu, centred @ centred.transpose(1, 2) / pixels.shape[2]

    mu_l, cov_l = stats(low)
    mu_h, cov_h = stats(high)
    return mean_weight * F.mse_loss(mu_h, mu_l) + cov_weight * F.mse_loss(cov_h, cov_l)
