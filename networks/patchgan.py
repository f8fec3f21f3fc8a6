"""PatchGAN discriminator (pix2pix, taming-transformers' ``NLayerDiscriminator``): one real/fake
logit per overlapping image patch instead of one per image."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """Images ``(b, 3, h, w)`` -> patch logits ``(b, 1, h', w')``.

    Args:
        channels: width of the first layer, doubled per layer up to 8x.
        num_layers: stride-2 layers after the first (taming: 3 for 256 px; 2 suits 32 px).
        norm: ``batch`` (taming), ``group`` or ``none``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        num_layers: int = 3,
        norm: Literal["batch", "group", "none"] = "batch",
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride, 1, bias=norm == "none"),
                _norm(norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def r1_penalty(discriminator: nn.Module, real: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, R1 penalty) of ``real`` images: the penalty is the squared norm of the gradient of
    each image's mean patch logit with respect to its pixels, averaged over the batch (Mescheder
    et al. 2018). It keeps the discriminator smooth around real images, so that a reconstruction
    cannot fool it with a perturbation too small to see."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.float().flatten(1).mean(1).sum(), real, create_graph=True)
    return logits, grad.float().pow(2).flatten(1).sum(1).mean()
