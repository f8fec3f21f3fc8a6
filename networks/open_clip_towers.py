"""open_clip's architectures as the two towers of ``lightning_modules.clip.CLIP``.

``open_clip.create_model(name, pretrained=None)`` builds the model: nothing is downloaded.
Pretrained weights come from a local file (``weights``) when the user has one. Each tower keeps
its own half of the model.

Both towers output vectors in open_clip's embedding space (after its projections), so ``dim`` is
the model's ``embed_dim``. A CLIP built with ``embed_dim: null`` adds no projection of its own,
and a pretrained pair keeps its alignment.
"""

from __future__ import annotations

import difflib
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, MissingFileError
from .text_encoders import TextEncoding, warn_truncated


def build_open_clip(name: str, weights: str | None, overrides: dict | None, option: str) -> nn.Module:
    """``open_clip.create_model(name, pretrained=None, **overrides)``, then the weights of a local file."""
    import open_clip

    if name not in open_clip.list_models():
        near = difflib.get_close_matches(name, open_clip.list_models(), n=6, cutoff=0.5)
        raise ConfigError(
            f"{option}.name: open_clip has no model {name!r}"
            + (f"; close names: {', '.join(near)}" if near else "")
            + " (open_clip.list_models() lists them all)"
        )
    if weights is not None and not os.path.isfile(weights):
        raise MissingFileError(
            f"{option}.weights: open_clip weights file {weights!r} not found. Nothing is downloaded at run "
            "time: download the checkpoint once (e.g. open_clip_pytorch_model.bin) and give its local path, "
            "or leave weights unset to start from random weights"
        )
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, 40))  # open_clip warns "initialized randomly": random is what weights=None asks for
    try:
        model = open_clip.create_model(name, pretrained=None, **(overrides or {}))
    finally:
        logger.setLevel(level)
    if weights is not None:
        open_clip.load_checkpoint(model, weights)
    return model


class OpenCLIPImageTower(nn.Module):
    """Images in [-1, 1] -> open_clip's image embedding ``(b, embed_dim)``.

    Images are resized to the model's input size (bicubic, antialiased) and normalised with its
    mean and std, as open_clip's preprocessing does.

    Args:
        name: an open_clip model name (``open_clip.list_models()``).
        weights: a local open_clip checkpoint, or None for random weights.
        overrides: keyword arguments of ``create_model`` that change the architecture (e.g. a small
            ``vision_cfg`` for tests or small data).
        option: the config option that named the model, for the error messages.
    """

    def __init__(self, name: str, weights: str | None = None, overrides: dict | None = None,
                 option: str = "model.init_args.image_tower.init_args"):  # fmt: skip
        super().__init__()
        model = build_open_clip(name, weights, overrides, option)
        self.visual = model.visual
        size = self.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.dim = model.embed_dim if hasattr(model, "embed_dim") else self.visual.output_dim
        cfg = getattr(self.visual, "preprocess_cfg", {})
        import open_clip

        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1), persistent=False)  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        return self.visual(((x - self.mean) / self.std).to(images.dtype))


class OpenCLIPTextTower(nn.Module):
    """Captions -> the text-encoder interface (tokens, mask, pooled) from open_clip's text half.

    ``pooled`` is open_clip's text embedding (``encode_text``), ``tokens`` the final token states
    under the same projection, so both have ``dim = embed_dim``. Captions longer than the context
    are truncated with a warning. Only models with open_clip's own tokenizer are supported (a
    Hugging Face tokenizer would need a download).

    Args:
        name, weights, overrides: as for :class:`OpenCLIPImageTower`.
    """

    def __init__(self, name: str, weights: str | None = None, overrides: dict | None = None):
        super().__init__()
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        option = "model.init_args.text_tower.init_args"
        model = build_open_clip(name, weights, overrides, option)
        if not hasattr(model, "token_embedding"):
            raise ConfigError(f"{option}.name: {name!r} has a custom text tower; use a CLIP model with open_clip's own text transformer")
        self.context_length = int(model.context_length)
        self.tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        if not isinstance(self.tokenizer, SimpleTokenizer):
            raise ConfigError(f"{option}.name: {name!r} needs a Hugging Face tokenizer (a download); use a model with open_clip's own")
        model.visual = None
        for name in ("logit_scale", "logit_bias"):  # the CLIP module has its own temperature
            if isinstance(getattr(model, name, None), nn.Parameter):
                getattr(model, name).requires_grad_(False)
        self.model = model
        self.dim = int(model.embed_dim if hasattr(model, "embed_dim") else model.text_projection.shape[1])
        self._states: Tensor | None = None
        model.ln_final.register_forward_hook(lambda m, i, out: setattr(self, "_states", out))

    def _project(self, x: Tensor) -> Tensor:
        proj = self.model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def forward(self, captions: list[str]) -> TextEncoding:
        captions = list(captions)
        warn_truncated(self, captions, [len(self.tokenizer.encode(c)) + 2 for c in captions], self.context_length)
        ids = self.tokenizer(captions).to(self.model.token_embedding.weight.device)
        pooled = self.model.encode_text(ids)
        tokens, self._states = self._project(self._states), None
        eot = ids.argmax(-1)  # the end token has the largest id
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
        return TextEncoding(tokens, mask, pooled)

