"""Building blocks of a text-conditional StyleGAN with BigGAN's tools (StyleGAN2, StyleGAN-T,
BigGAN): the mapping network from a latent and a pooled text embedding to a style ``w``,
modulated and demodulated convolutions, BigGAN's orthogonal regularisation, and the truncation
trick towards a prompt's mean ``w``, and the generator built from them (``StyleGenerator``),
trained by ``lightning_modules.gan.TextToImageGAN`` against its matching-aware discriminator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import Generators, randn
from .stackgan import GeneratorOutput, _log2_steps


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
    style. Run as StyleGAN2's non-fused form: the input scaled by the style, one convolution with
    the shared weight, the output scaled by the demodulation factors (the same numbers as a
    convolution with each sample's modulated weight, and far faster than a grouped one on CPUs).

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
        style = self.affine(w)  # (b, in)
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:  # 1 / |each output channel's modulated weight|: (b, out)
            out = out * (style.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8).rsqrt()[:, :, None, None]
        return out


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


class StyledLayer(nn.Module):
    """A modulated 3x3 convolution, per-pixel noise (its strength per channel learned from 0), a
    bias and a leaky ReLU: one layer of StyleGAN2's synthesis network."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise: Tensor) -> Tensor:
        x = self.conv(x, w) + self.noise_strength[:, None, None] * noise
        return F.leaky_relu(x + self.bias[:, None, None], 0.2) * math.sqrt(2)


class TextCrossAttention(nn.Module):
    """Image positions attend to the caption's tokens (StyleGAN-T and GigaGAN at low
    resolutions), added through a gate that starts at 0 (the block starts as the identity)."""

    def __init__(self, channels: int, text_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        query = self.norm(x).flatten(2).transpose(1, 2)  # (b, h*w, c)
        out, _ = self.attention(query, tokens, tokens, key_padding_mask=None if mask is None else ~mask, need_weights=False)
        return x + self.gate * out.transpose(1, 2).reshape(b, c, h, w)


class StyleGenerator(nn.Module):
    """A text-conditional StyleGAN2 generator (skip architecture): a learned 4x4 constant, then per
    resolution up to ``image_size`` a bilinear 2x upsampling and two ``StyledLayer``s, each block
    adding its RGB to the upsampled RGB so far. ``w`` comes from ``MappingNetwork(z, sentence)``.

    Args:
        text_dim: the text encoder's pooled (and token) size.
        image_size: output side (4 times a power of two).
        z_dim: latent size.
        w_dim: style size.
        channels: channels at 4 and 8 px, halved per block from 16 px on (at least ``channels // 8``).
        mapping_layers: depth of the mapping network.
        attention_resolutions: sides at which the image attends to the caption's tokens
            (``TextCrossAttention`` after each block of that side); empty: the pooled text alone.
        heads: attention heads.
        hierarchical: BigGAN's hierarchical latents: ``z`` is split into a chunk for the mapping
            network and one per block, whose projection (from 0) is added to that block's ``w``.
        output_scales: how many images the generator returns, lowest first: the skip
            architecture's running RGB at the last ``output_scales`` sides (1: the image alone; 2
            at 32 px: 16 and 32 px), each for its own discriminator (GigaGAN's multi-scale
            input-output discriminator, in StackGAN++'s form: one discriminator per side).

    ``forward(z, sentence, generator=rng, tokens=..., mask=..., truncation=psi, w=None)`` returns a
    ``GeneratorOutput`` with ``output_scales`` images (``mu``/``logvar`` None: no conditioning
    augmentation); ``w``, when given, replaces the mapping network's output (CLIP + GAN optimises it).
    ``truncation`` (in [0, 1]) pulls ``w`` towards the prompt's mean ``w`` (``mean_w``, over a
    fixed draw of latents) and scales the hierarchical chunks' contributions and the per-pixel
    noise by the same factor (their mean is 0), so that ``truncation=0`` draws the prompt's mean
    image whatever the seed.
    """

    def __init__(self, text_dim: int, image_size: int = 32, z_dim: int = 64, w_dim: int = 256,
                 channels: int = 256, mapping_layers: int = 4, attention_resolutions: tuple[int, ...] = (8,),
                 heads: int = 4, hierarchical: bool = False, output_scales: int = 1):  # fmt: skip
        super().__init__()
        self.image_size, self.hierarchical = image_size, hierarchical
        blocks = _log2_steps(image_size, 4, "generator image size")
        if not 1 <= output_scales <= blocks:  # the 4 px image is not one: discriminators start at 8 px
            raise ValueError(f"output_scales must be in [1, {blocks}] for {image_size} px, got {output_scales}")
        self.output_scales = output_scales
        self.chunk = z_dim // (blocks + 1) if hierarchical else 0
        if hierarchical and self.chunk < 1:
            raise ValueError(f"hierarchical latents need z_dim >= {blocks + 1} (one chunk per block and one to map)")
        self.z_dim = z_dim
        self.mapping = MappingNetwork(z_dim - blocks * self.chunk, text_dim, w_dim, mapping_layers)
        widths = [max(channels >> max(0, i - 1), channels // 8) for i in range(blocks + 1)]  # halved from 16 px on
        self.const = nn.Parameter(torch.randn(channels, 4, 4))
        self.first = StyledLayer(channels, widths[0], w_dim)
        self.first_rgb = ModulatedConv2d(widths[0], 3, 1, w_dim, demodulate=False)
        self.layers = nn.ModuleList(
            nn.ModuleList([StyledLayer(a, b, w_dim), StyledLayer(b, b, w_dim)]) for a, b in zip(widths, widths[1:])
        )
        self.to_rgb = nn.ModuleList(ModulatedConv2d(b, 3, 1, w_dim, demodulate=False) for b in widths[1:])
        self.attention = nn.ModuleDict(
            {str(i): TextCrossAttention(widths[i], text_dim, heads) for i in range(blocks + 1) if 4 << i in attention_resolutions}
        )  # fmt: skip
        unknown = set(attention_resolutions) - {4 << i for i in range(blocks + 1)}
        if unknown:
            raise ValueError(f"attention_resolutions {sorted(unknown)} are not sides of this generator (4 to {image_size})")
        self.uses_tokens = bool(self.attention)
        self.block_latent = nn.ModuleList(nn.Linear(self.chunk, w_dim) for _ in range(blocks if hierarchical else 0))
        for layer in self.block_latent:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def ortho_weights(self) -> Iterator[Tensor]:
        """The matrices BigGAN's orthogonal regularisation applies to: every modulated convolution's
        effective weight (its equalised-learning-rate scale applied) and the mapping network's
        layers (not the 4x4 constant, the style affines, the attention or the latent projections)."""
        for module in self.modules():
            if isinstance(module, ModulatedConv2d):
                yield module.weight * module.scale
        yield from (m.weight for m in self.mapping.modules() if isinstance(m, nn.Linear))

    def styles(self, z: Tensor, sentence: Tensor, truncation: float = 1.0, w: Tensor | None = None) -> list[Tensor]:
        """The ``w`` of every block (the 4x4 one first), truncated towards the prompt's mean;
        ``w`` given replaces the mapping network's."""
        if w is None:
            w = self.mapping(z[:, : self.mapping.z_dim], sentence)
        if truncation != 1.0:
            w = truncate(w, mean_w(self.mapping, sentence, generator=torch.Generator(sentence.device).manual_seed(0)), truncation)
        chunks = z[:, self.mapping.z_dim :].split(self.chunk, dim=1) if self.hierarchical else []
        return [w] + [w + truncation * proj(c) for proj, c in zip(self.block_latent, chunks)] if chunks else [w] * (1 + len(self.layers))

    def forward(self, z: Tensor, sentence: Tensor, generator: Generators = None, tokens: Tensor | None = None,
                mask: Tensor | None = None, truncation: float = 1.0, w: Tensor | None = None) -> GeneratorOutput:  # fmt: skip
        if self.uses_tokens and tokens is None:
            raise ValueError("this generator attends to the caption's tokens (attention_resolutions): pass tokens=")
        ws = self.styles(z, sentence, truncation, w)
        b = z.shape[0]

        def noise(side: int) -> Tensor:
            return truncation * randn((b, 1, side, side), generator, device=z.device, dtype=z.dtype)

        x = self.first(self.const.expand(b, -1, -1, -1), ws[0], noise(4))
        if "0" in self.attention:
            x = self.attention["0"](x, tokens, mask)
        rgb = self.first_rgb(x, ws[0])
        images = []
        for i, ((a, c), to_rgb) in enumerate(zip(self.layers, self.to_rgb), start=1):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            side = x.shape[-1]
            x = c(a(x, ws[i], noise(side)), ws[i], noise(side))
            if str(i) in self.attention:
                x = self.attention[str(i)](x, tokens, mask)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + to_rgb(x, ws[i])
            if i > len(self.layers) - self.output_scales:
                images.append(torch.tanh(rgb))
        return GeneratorOutput(images, None, None)
