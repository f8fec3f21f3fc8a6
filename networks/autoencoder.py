"""Convolutional encoder and decoder of the autoencoders (VQ-VAE, VQGAN, KL), after
taming-transformers and latent-diffusion: ResNet blocks with group norm, a factor-2 down- or
upsampling between resolution levels, and an optional self-attention block in the middle.

The downsampling factor is ``2 ** (len(channel_mult) - 1)``: ``(1, 2, 2)`` is f4, ``(1, 1, 2, 2)``
f8, ``(1, 1, 2, 2, 4)`` f16.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """Group norm with 32 groups where the width allows, fewer for narrow layers."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(channels_in),
            nn.SiLU(),
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            group_norm(channels_out),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels_out, channels_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (b, hw, c) each
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.out(y)


def _mid(channels: int, attention: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(channels, channels, dropout),
        Attention(channels) if attention else nn.Identity(),
        ResBlock(channels, channels, dropout),
    )


class Encoder(nn.Module):
    """Images ``(b, in_channels, h, w)`` -> ``(b, out_channels, h / f, w / f)``.

    Args:
        channels: width of the first level; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: one entry per resolution level; ``f = 2 ** (len(channel_mult) - 1)``.
        num_res_blocks: ResNet blocks per level.
        attention: a self-attention block in the middle (at the lowest resolution).
        out_channels: output channels (the latent channels; twice that for a Gaussian posterior).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        out_channels: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        width = widths[0]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(width, w, dropout))
                width = w
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [_mid(width, attention, dropout), group_norm(width), nn.SiLU()]
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latents ``(b, in_channels, h / f, w / f)`` -> images ``(b, out_channels, h, w)``
    (unbounded; the autoencoder's loss compares them with images in [-1, 1]).

    The arguments mirror :class:`Encoder`'s (same ``channel_mult``, walked from the top level
    down). ``last_layer`` is the output convolution's weight, where VQGAN's adaptive weight
    compares the gradients of the reconstruction and adversarial losses.
    """

    def __init__(
        self,
        in_channels: int = 64,
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        out_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.upsample_factor = 2 ** (len(channel_mult) - 1)
        widths = [channels * m for m in channel_mult][::-1]
        width = widths[0]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1),
            _mid(width, attention, dropout),
        ]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(width, w, dropout))
                width = w
            if level < len(widths) - 1:
                layers += [
                    nn.Upsample(scale_factor=2.0, mode="nearest"),
                    nn.Conv2d(width, width, 3, padding=1),
                ]
        layers += [group_norm(width), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        self.in_channels = in_channels

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.net(z))
