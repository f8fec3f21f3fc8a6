"""CLIP trained on the shared shards: an image tower and a text tower projected into one space,
trained with the symmetric contrastive loss (or SigLIP's sigmoid loss) against the global batch.

The CLIP contract (``ARCHITECTURE.md``): ``encode_image(images in [-1, 1]) -> (b, d)`` and
``encode_text(list[str]) -> (b, d)``, both l2-normalised; :func:`load_clip` reads a trained one
from its checkpoint, frozen and without a trainer.
"""

from __future__ import annotations

import os
import uuid

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.clip_loss import (
    INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_SCALE,
    clip_loss,
    siglip_loss,
)
from networks.errors import ConfigError, MissingFileError
from networks.frozen import keep_out_of_checkpoints
from networks.text_encoders import TextEncoding

from .base import BaseModule, decay_groups


def _adamw(params):
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=True)


def retrieval_recall(
    image_features: Tensor, text_features: Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k of matching pairs (row ``i`` of each is a pair): image to text (``i2t``: is text
    ``i`` among the ``k`` texts most similar to image ``i``) and text to image (``t2i``). Ties
    do not push a pair down: it is found if fewer than ``k`` others score strictly higher."""
    sims = image_features.float() @ text_features.float().T
    own = sims.diag()
    out = {}
    for name, s, mine in (("i2t", sims, own[:, None]), ("t2i", sims.T, own[:, None])):
        rank = (s > mine).sum(1)  # how many others beat the matching one
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


class CLIP(BaseModule):
    """Contrastive image-text training.

    Args:
        image_tower: images in [-1, 1] -> ``(b, image_tower.dim)`` (e.g. ``networks.clip.ImageTower``).
        text_tower: an injected text encoder; its ``pooled`` vector is used.
        embed_dim: size of the shared space; None: no projection of this module's own (the towers
            already end in one space of the same size, as open_clip's do: a pretrained pair keeps
            its alignment).
        loss: ``clip`` (symmetric InfoNCE, open_clip's) or ``siglip`` (pairwise sigmoid).
        init_logit_scale: the log of the inverse temperature at the start; None: open_clip's
            start for the loss, ``log(1 / 0.07)`` for ``clip`` and ``log(10)`` for ``siglip``.
        init_logit_bias: SigLIP's learnable bias at the start (SigLIP: -10).
        optimizer, lr_scheduler: factories; weight decay as open_clip's: on every parameter of
            two or more dimensions (Linear and conv kernels, embeddings), not on gains, biases,
            the logit scale or bias.

    Lineage: every checkpoint records ``clip_lineage``: ``origin``, an id drawn when the CLIP
    started from a fresh initialisation, and ``resumed``, the ``origin@step`` of every checkpoint
    it was resumed or fine-tuned from. CLIPs with the same origin share weights' ancestry, so
    ``evaluate.py`` refuses one as the judge of a method that uses the other.

    ``logit_scale`` is clamped to ``[0, log(100)]`` after every optimizer step. Validation logs retrieval recall@1
    and @5 in both directions over the whole (fixed) validation set, all ranks together:
    ``val/retrieval_i2t_r1``, ``val/retrieval_t2i_r5``, ...
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int | None = 256,
        loss: str = "clip",
        init_logit_scale: float | None = None,
        init_logit_bias: float = -10.0,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("clip", "siglip"):
            raise ConfigError(f"model.init_args.loss must be 'clip' or 'siglip', got {loss!r}")
        self.image_tower, self.text_tower, self.loss_kind = image_tower, text_tower, loss
        if embed_dim is None:
            if image_tower.dim != text_tower.dim:
                raise ConfigError(
                    f"model.init_args.embed_dim is null but the towers' sizes differ (image {image_tower.dim}, "
                    f"text {text_tower.dim}): give embed_dim to project both into one space"
                )
            self.image_proj, self.text_proj = nn.Identity(), nn.Identity()
        else:
            self.image_proj = nn.Linear(image_tower.dim, embed_dim, bias=False)
            self.text_proj = nn.Linear(text_tower.dim, embed_dim, bias=False)
        if init_logit_scale is None:
            init_logit_scale = INIT_LOGIT_SCALE if loss == "clip" else SIGLIP_INIT_LOGIT_SCALE
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if loss == "siglip" else None
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._val_features: list[tuple[Tensor, Tensor]] = []
        self.lineage: dict | None = None  # set at the start of fitting, or from a loaded checkpoint

    def on_fit_start(self) -> None:
        if self.lineage is None:  # a fresh start: a new origin, the same on every rank
            self.lineage = {"origin": self.trainer.strategy.broadcast(uuid.uuid4().hex), "resumed": []}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clip_lineage"] = self.lineage

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        parent = checkpoint.get("clip_lineage")
        if parent is None:  # a checkpoint from before lineage was recorded
            self.lineage = {"origin": None, "resumed": []}
        else:
            step = checkpoint.get("global_step", 0)
            self.lineage = {"origin": parent["origin"], "resumed": [*parent["resumed"], f"{parent['origin']}@{step}"]}

    @property
    def image_size(self) -> int | None:
        return getattr(self.image_tower, "image_size", None)

    # ------------------------------------------------------------------ the contract
    def encode_image(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] of any size (resized to the tower's, bicubic) -> ``(b, d)``, l2-normalised."""
        size = self.image_size
        if size is not None and images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
        return F.normalize(self.image_proj(self.image_tower(images)).float(), dim=-1)

    def encode_text(self, captions: list[str]) -> Tensor:
        return F.normalize(self.text_proj(self.text_tower(list(captions)).pooled).float(), dim=-1)

    # ------------------------------------------------------------------ training
    def loss(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        if self.loss_kind == "siglip":
            return siglip_loss(image_features, text_features, self.logit_scale, self.logit_bias)
        return clip_loss(image_features, text_features, self.logit_scale)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(self.encode_image(batch["image"]), self.encode_text(batch["caption"]))
        b = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/logit_scale", self.logit_scale.detach().exp(), batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():  # after the optimizer step, as open_clip does
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def on_validation_epoch_start(self) -> None:
        self._val_features = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, text = self.encode_image(batch["image"]), self.encode_text(batch["caption"])
        self.log("val/loss", self.loss(image, text), sync_dist=True, batch_size=len(batch["caption"]))
        self._val_features.append((image, text))

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        image = torch.cat([i for i, _ in self._val_features])
        text = torch.cat([t for _, t in self._val_features])
        if self.trainer.world_size > 1:  # the whole validation set, every rank's part
            image, text = self.all_gather(image).flatten(0, 1), self.all_gather(text).flatten(0, 1)
        for name, value in retrieval_recall(image, text).items():
            self.log(f"val/retrieval_{name}", value, rank_zero_only=True)
        self._val_features = []

    def configure_optimizers(self):
        return self.optimizer_with_scheduler(
            self.optimizer_factory(decay_groups(self, every_matrix=True)), self.lr_scheduler_factory
        )


def load_clip(path: str, map_location: str | torch.device = "cpu", option: str | None = None) -> CLIP:
    """A trained CLIP from its checkpoint, frozen and in eval mode, with no trainer."""
    if not path or not os.path.isfile(path):
        raise MissingFileError(
            f"{option + ': ' if option else ''}CLIP checkpoint {path!r} not found: train one first "
            "(configs/clip/clip_shapes.yaml) and give its checkpoints/last.ckpt or best-*.ckpt"
        )
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    if "image_tower" not in hparams or "text_tower" not in hparams:
        raise ConfigError(
            f"{option + ': ' if option else ''}{path!r} is not a CLIP checkpoint "
            f"({hparams.get('_class_path', 'no model class recorded')}): give one trained with configs/clip/"
        )
    model = CLIP.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return model.requires_grad_(False).eval()


class CLIPTextEncoder(nn.Module):
    """The text tower of a trained CLIP with the text-encoder interface (tokens, mask, pooled),
    frozen, so that diffusion, the GANs and the priors condition on the project's own CLIP
    (Imagen-style). Its weights stay out of the method's checkpoints, which store the path.

    Args:
        path: the CLIP checkpoint.
        projected: pool into the shared image-text space (``text_proj``, l2-normalised) instead of
            the tower's own pooled vector; ``dim`` stays the tokens' width.
    """

    def __init__(self, path: str, projected: bool = False):
        super().__init__()
        clip = load_clip(path, option="model.init_args.text_encoder.init_args.path")
        self.tower, self.proj, self.projected = clip.text_tower, clip.text_proj, projected
        self.dim = clip.text_tower.dim
        self.requires_grad_(False).eval()
        keep_out_of_checkpoints(self)

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        super().train(mode)
        self.tower.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEncoding:
        out = self.tower(list(captions))
        if not self.projected:
            return out
        return TextEncoding(out.tokens, out.mask, F.normalize(self.proj(out.pooled).float(), dim=-1))
