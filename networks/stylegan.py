"""Building blocks of a text-conditional StyleGAN with BigGAN's tools (StyleGAN2, StyleGAN-T,
BigGAN): the mapping network from a latent and a pooled text embedding to a style ``w``,
modulated and demodulated convolutions, BigGAN's orthogonal regularisation, and the truncation
trick towards a prompt's mean ``w``. (The generator, the discriminator and their LightningModule
are not built yet; these parts are tested on their own in ``tests/test_stylegan.py``.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """``x`` scaled to a unit mean square over its last dimension (StyleGAN's input normalisation)."""
    return x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """``(z, text) -> w``: StyleGAN's MLP over the normalised latent and the normalised projection
    of the pooled text embedding (BigGAN's shared embedding: one projection, read by every block
    through ``w``).

    Args:
        z_dim: latent size (0: text alone, as StyleGAN-T allows).
        text_dim: pooled text embedding size.
        w_dim: style size.
        layers: MLP depth (StyleGAN: 8; StyleGAN-T: 2).
    """

    def __init__(self, z_dim: int, text_dim: int, w_dim: int, layers: int = 4):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.z_dim, self.w_dim = z_dim, w_dim
        self.text = nn.Linear(text_dim, w_dim)
        dims = [z_dim + w_dim] + [w_dim] * layers
        self.mlp = nn.Sequential(*(m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))))

    def forward(self, z: Tensor, text: Tensor) -> Tensor:
        parts = [normalize_2nd_moment(z)] if self.z_dim else []
        return self.mlp(torch.cat(parts + [normalize_2nd_moment(self.text(text))], dim=-1))


class ModulatedConv2d(nn.Module):
    """StyleGAN2's convolution: the weight is scaled per input channel by a style (an affine map
    of ``w``, biased to 1) and, with ``demodulate``, rescaled per output channel to unit norm, so
    that an input of independent unit-variance entries gives unit-variance outputs whatever the
    style. Run as one grouped convolution over the batch.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d`` (odd kernel, same padding).
        w_dim: style size.
        demodulate: rescale each output channel's modulated weight to unit norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)  # the style starts as the identity
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)  # equalised learning rate
        self.demodulate, self.padding = demodulate, kernel_size // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        b, c, h, width = x.shape
        style = self.affine(w)  # (b, in)
        weight = self.weight[None] * self.scale * style[:, None, :, None, None]  # (b, out, in, k, k)
        if self.demodulate:
            weight = weight * (weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        out = F.conv2d(x.reshape(1, b * c, h, width), weight.flatten(0, 1), padding=self.padding, groups=b)
        return out.reshape(b, -1, h, width)


def orthogonal_penalty(weights: Iterable[Tensor], strength: float = 1e-4) -> Tensor:
    """BigGAN's orthogonal regularisation as a loss: ``strength / 2 * sum ||W W^T * (1 - I)||_F^2``
    over the weights (each flattened to ``(out, -1)``; vectors and scalars are skipped). Its gradient,
    ``strength * 2 (W W^T * (1 - I)) W``, is the update BigGAN-PyTorch's ``ortho`` adds to a weight's
    gradient: it pulls the filters apart without constraining their norms."""
    total = None
    for weight in weights:
        if weight.dim() < 2:
            continue
        flat = weight.reshape(weight.shape[0], -1)
        gram = flat @ flat.T
        off = gram * (1 - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))
        total = off.square().sum() if total is None else total + off.square().sum()
    if total is None:
        raise ValueError("orthogonal_penalty got no matrix (every weight had fewer than 2 dimensions)")
    return strength / 2 * total


@torch.no_grad()
def mean_w(mapping: MappingNetwork, text: Tensor, samples: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Each prompt's mean style: ``w`` averaged over ``samples`` latents (StyleGAN-T's conditional
    truncation centre). ``text``: (b, text_dim) pooled embeddings; returns (b, w_dim)."""
    z = torch.randn(samples, text.shape[0], mapping.z_dim, generator=generator, device=text.device, dtype=text.dtype)
    return mapping(z, text.expand(samples, *text.shape)).mean(dim=0)


def truncate(w: Tensor, centre: Tensor, psi: float) -> Tensor:
    """The truncation trick: ``centre + psi (w - centre)``; ``psi`` 1 keeps ``w``, 0 gives the centre."""
    if not 0 <= psi <= 1:
        raise ValueError(f"truncation psi must be in [0, 1], got {psi}")
    return torch.lerp(centre, w, psi)
