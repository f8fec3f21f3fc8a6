"""Networks of the text-conditional VAE: a posterior ``q(z | image, text)``, a learned prior
``p(z | text)`` and a decoder ``p(image | z, text)``, each a diagonal Gaussian or a conv net.

The decoder starts from a 4x4 map made of ``[z, text]`` and upsamples to the image size with
residual blocks whose group norm takes its scale and shift from ``[z, text]`` (FiLM), so the
latent and the caption steer every resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import group_norm
from .errors import ConfigError


def diagonal_gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per dimension (same shape as mu_q)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0)


class FiLMResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, cond_dim: int):
        super().__init__()
        self.norm1, self.norm2 = group_norm(channels_in), group_norm(channels_out)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * channels_out)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


def _gaussian_head(dim_in: int, hidden: int, latent_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 2 * latent_dim))  # fmt: skip


class ConditionalVAENet(nn.Module):
    """Args:
    image_size: side of the images (a power of two, at least 8).
    text_dim: size of the text encoder's pooled vector.
    latent_dim: size of ``z``.
    channels: width at the highest resolution; doubled per halving, up to 4x.
    hidden: width of the Gaussian heads (posterior and prior MLPs).
    """

    def __init__(self, image_size: int = 32, text_dim: int = 128, latent_dim: int = 64, channels: int = 64,
                 hidden: int = 256):  # fmt: skip
        super().__init__()
        levels = int(math.log2(image_size)) - 2
        if image_size < 8 or 2 ** (levels + 2) != image_size:
            raise ConfigError(f"image_size must be a power of two of at least 8, got {image_size}")
        self.image_size, self.text_dim, self.latent_dim = image_size, text_dim, latent_dim
        widths = [channels * min(2**i, 4) for i in range(levels + 1)]  # highest resolution first
        down: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for w_in, w_out in zip(widths, widths[1:]):
            down += [group_norm(w_in), nn.SiLU(), nn.Conv2d(w_in, w_out, 4, stride=2, padding=1)]
        down += [group_norm(widths[-1]), nn.SiLU(), nn.Flatten()]
        self.image_features = nn.Sequential(*down)  # -> widths[-1] * 4 * 4
        self.posterior_head = _gaussian_head(widths[-1] * 16 + text_dim, hidden, latent_dim)
        self.prior_head = _gaussian_head(text_dim, hidden, latent_dim)
        cond_dim = latent_dim + text_dim
        self.start = nn.Linear(cond_dim, widths[-1] * 16)
        self.up = nn.ModuleList(FiLMResBlock(w_in, w_out, cond_dim)
                                for w_in, w_out in zip(widths[::-1], widths[::-1][1:]))  # fmt: skip
        self.final = FiLMResBlock(widths[0], widths[0], cond_dim)
        self.to_rgb = nn.Sequential(group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1))
        self.top_width = widths[-1]

    def posterior(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """``q(z | image, text)``: mean and log-variance ``(b, latent_dim)`` each."""
        h = torch.cat([self.image_features(image), text], dim=1)
        mu, logvar = self.posterior_head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def prior(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """``p(z | text)``: mean and log-variance ``(b, latent_dim)`` each."""
        mu, logvar = self.prior_head(text).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: Tensor, text: Tensor) -> Tensor:
        """``(z, text) -> (b, 3, s, s)``, unbounded (the mean of the image likelihood)."""
        cond = torch.cat([z, text], dim=1)
        x = self.start(cond).view(-1, self.top_width, 4, 4)
        for block in self.up:
            x = block(F.interpolate(x, scale_factor=2.0, mode="nearest"), cond)
        return self.to_rgb(self.final(x, cond))
