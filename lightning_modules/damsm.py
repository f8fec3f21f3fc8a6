"""DAMSM (AttnGAN's Deep Attentional Multimodal Similarity Model), pretrained on the shards before
the AttnGAN that uses it frozen: an image encoder of regions and a global vector, a text encoder of
words and a sentence vector, trained with the word and sentence matching losses of
``networks.attngan``.

With ``encode_image`` and ``encode_text`` (global and sentence vectors, l2-normalised) it also
answers the CLIP contract's two calls, which is what the AttnGAN paper's own R-precision needs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.attngan import DAMSMImageEncoder, DAMSMTextEncoder, damsm_loss, same_captions
from networks.errors import ConfigError, MissingFileError

from .base import BaseModule
from .clip import retrieval_recall


def _adam(params):
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))  # AttnGAN's DAMSM


class DAMSM(BaseModule):
    """Args:
        image_encoder: ``networks.attngan.DAMSMImageEncoder``.
        text_encoder: any text encoder of the framework (tokens, mask, pooled), trained here;
            wrapped with DAMSM's word and sentence projections to the image encoder's ``dim``.
        gamma1, gamma2, gamma3: the paper's smoothing factors (4, 5, 10): attention sharpness over
            regions, the weight of the best-matching words, and the softmax over the batch.
        mask_same_captions: pairs of a batch with the same caption are not negatives.
        optimizer, lr_scheduler: factories.

    Validation logs the two losses and the sentence-level retrieval recall over the validation
    set (``val/retrieval_t2i_r1``, ...), the number R-precision builds on.
    """

    def __init__(
        self,
        image_encoder: DAMSMImageEncoder,
        text_encoder: nn.Module,
        gamma1: float = 4.0,
        gamma2: float = 5.0,
        gamma3: float = 10.0,
        mask_same_captions: bool = True,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.image_encoder = image_encoder
        self.text_encoder = DAMSMTextEncoder(text_encoder, image_encoder.dim)
        self.gammas = (gamma1, gamma2, gamma3)
        self.mask_same_captions = mask_same_captions
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._val: list[tuple[Tensor, Tensor]] = []

    @property
    def image_size(self) -> int:
        return self.image_encoder.image_size

    # ------------------------------------------------------------------ CLIP's two calls
    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_encoder(images)[1].float(), dim=-1)

    def encode_text(self, captions: list[str]) -> Tensor:
        return F.normalize(self.text_encoder(list(captions)).pooled.float(), dim=-1)

    # ------------------------------------------------------------------ the loss
    def losses(self, images: Tensor, captions: list[str], encoding=None) -> tuple[Tensor, Tensor]:
        """(word loss, sentence loss) of matching images and captions; ``encoding`` reuses a
        ``DAMSMTextEncoder`` output already made."""
        regions, global_image = self.image_encoder(images)
        text = encoding if encoding is not None else self.text_encoder(list(captions))
        same = same_captions(captions).to(images.device) if self.mask_same_captions else None
        return damsm_loss(text.tokens, text.mask, text.pooled, regions.flatten(2).transpose(1, 2), global_image,
                          *self.gammas, same=same)  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        word, sentence = self.losses(batch["image"], list(batch["caption"]))
        b = len(batch["caption"])
        self.log_dict({"train/word_loss": word, "train/sentence_loss": sentence}, batch_size=b)
        self.log("train/loss", word + sentence, prog_bar=True, batch_size=b)
        return word + sentence

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        captions = list(batch["caption"])
        word, sentence = self.losses(batch["image"], captions)
        self.log_dict({"val/word_loss": word, "val/sentence_loss": sentence}, sync_dist=True, batch_size=len(captions))
        self._val.append((self.encode_image(batch["image"]), self.encode_text(captions)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        image, text = (torch.cat(x) for x in zip(*self._val))
        if self.trainer.world_size > 1:
            image, text = self.all_gather(image).flatten(0, 1), self.all_gather(text).flatten(0, 1)
        for name, value in retrieval_recall(image, text).items():
            self.log(f"val/retrieval_{name}", value, rank_zero_only=True)
        self._val = []

    def configure_optimizers(self):
        return self.optimizer_with_scheduler(self.optimizer_factory(self.parameters()), self.lr_scheduler_factory)


def load_damsm(path: str, map_location: str | torch.device = "cpu", option: str | None = None) -> DAMSM:
    """A trained DAMSM from its checkpoint, frozen and in eval mode."""
    where = f"{option}: " if option else ""
    if not path or not os.path.isfile(path):
        raise MissingFileError(
            f"{where}DAMSM checkpoint {path!r} not found: pretrain one first "
            "(python train.py fit --config configs/gan/damsm_shapes32.yaml) and give its checkpoints/last.ckpt"
        )
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    if "image_encoder" not in hparams or "gamma3" not in hparams:
        raise ConfigError(f"{where}{path!r} is not a DAMSM checkpoint ({hparams.get('_class_path', 'no model class recorded')})")
    return DAMSM.load_from_checkpoint(path, map_location=map_location, weights_only=False).requires_grad_(False).eval()

