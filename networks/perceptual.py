"""LPIPS perceptual loss with its trunk read from a local file: nothing is downloaded.

The ``lpips`` package ships the small linear heads calibrated on human judgements inside its
wheel, but fetches the trunk (torchvision's ImageNet VGG16 or AlexNet) from the internet on
first use. Here the trunk's weights come from ``path``: a torchvision state dict file (the
``features.*`` entries are used, the classifier is ignored) or a folder holding torchvision's
file (``vgg16-397923af.pth``, ``alexnet-owt-7be5be79.pth``: copy it from
``~/.cache/torch/hub/checkpoints`` of a machine that has it).
"""

from __future__ import annotations

import glob
import os
import warnings

import torch
from torch import Tensor, nn

from .errors import ConfigError, MissingFileError

TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
# lpips splits torchvision's ``features`` into slices at these layer indices
SLICES = {"vgg": (0, 4, 9, 16, 23, 30), "alex": (0, 2, 5, 8, 10, 12)}


def _weights_file(path: str, net: str, option: str) -> str:
    if os.path.isdir(path):
        named = os.path.join(path, TORCHVISION_FILES[net])
        if os.path.isfile(named):
            return named
        found = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.pt")))
        if len(found) == 1:
            return found[0]
        raise MissingFileError(
            f"{option}: the folder {path!r} holds {len(found) or 'no'} weight files; put torchvision's "
            f"{TORCHVISION_FILES[net]} there or name the file itself"
        )
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{option}: {path!r} does not exist. Give the local torchvision {net} weights "
            f"({TORCHVISION_FILES[net]}, from ~/.cache/torch/hub/checkpoints on a machine that has them), "
            "or set the perceptual weight to 0 to train without a perceptual loss"
        )
    return path


def trunk_state_dict(state: dict, net: str) -> dict:
    """A torchvision ``vgg16`` / ``alexnet`` state dict -> the keys of lpips' sliced trunk."""
    bounds = SLICES[net]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # the classifier
        layer = int(parts[1])
        slice_no = next(i for i in range(5) if bounds[i] <= layer < bounds[i + 1]) + 1
        out[f"slice{slice_no}.{layer}.{'.'.join(parts[2:])}"] = value
    return out


class PerceptualLoss(nn.Module):
    """LPIPS distance ``(x, y) -> (b,)`` between images in [-1, 1], frozen, in eval mode.

    Args:
        path: the trunk's weights (file or folder, see the module's docstring).
        net: ``vgg`` (taming-transformers, latent-diffusion) or ``alex``.
        option: the config option that named ``path``, for the error messages.
    """

    def __init__(self, path: str, net: str = "vgg", option: str = "perceptual_path"):
        super().__init__()
        import lpips

        if net not in TORCHVISION_FILES:
            raise ConfigError(f"{option}: net must be one of {sorted(TORCHVISION_FILES)}, got {net!r}")
        file = _weights_file(path, net, option)
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained`
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # heads from the wheel
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = self.lpips.net.load_state_dict(trunk_state_dict(state, net), strict=False)
        if missing:
            raise ConfigError(
                f"{option}: {file} is not torchvision {net} weights (missing {missing[:3]} ...)"
            )
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no dropout in the heads

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.lpips(x.float(), y.float()).flatten()
