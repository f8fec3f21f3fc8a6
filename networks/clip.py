"""The image tower of a CLIP trained here: the autoencoder's ResNet encoder, its final feature map
flattened (so that where a thing is stays in the vector: "on the left" is part of the captions)
and projected to ``width``. The text tower is any injected text encoder (its pooled vector)."""

from __future__ import annotations

from torch import Tensor, nn

from .autoencoder import Encoder


class ImageTower(nn.Module):
    """Images ``(b, 3, image_size, image_size)`` in [-1, 1] -> ``(b, width)``.

    Args:
        image_size: side of the input images (a multiple of the downsampling factor).
        channels, channel_mult, num_res_blocks, attention: the ``networks.autoencoder.Encoder``.
        feature_channels: channels of the final feature map.
        width: output size (``dim``).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        feature_channels: int = 32,
        width: int = 256,
    ):
        super().__init__()
        self.encoder = Encoder(channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                               attention=attention, out_channels=feature_channels)  # fmt: skip
        side = image_size // self.encoder.downsample_factor
        if side * self.encoder.downsample_factor != image_size:
            raise ValueError(f"image_size {image_size} is not a multiple of {self.encoder.downsample_factor}")
        self.image_size, self.dim = image_size, width
        self.proj = nn.Linear(feature_channels * side * side, width)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.encoder(images).flatten(1))
