"""Token priors on a frozen VQ autoencoder: the autoregressive transformer (DALL-E, Taming,
Parti) and MaskGIT's parallel decoding. Both are text-to-image methods: ``generate`` samples
image tokens for the prompts and the autoencoder decodes them.

Image tokens come from the batch's ``tokens`` (pre-tokenised shards,
``scripts/tokenize_shards.py``) when it has them, else from encoding the batch's images with
the frozen autoencoder on the fly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.errors import ConfigError
from networks.noise import Generators
from networks.text_encoders import BPETokenizer, ByteTokenizer
from networks.transformer import (
    choice_noise,
    guided_logits,
    gumbel,
    mask_ratio,
    masked_per_step,
    sample_autoregressive,
    sample_from_logits,
)

from .autoencoder import FrozenAutoencoderUser
from .base import TextToImageModule, decay_groups


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)


class TokenPrior(FrozenAutoencoderUser, TextToImageModule):
    """What the token priors share: the frozen autoencoder, image tokens of a batch, caption
    dropout, optimizers with decay on Linear weights only, decoding tokens to images.

    Args:
        autoencoder: checkpoint path of a trained VQ autoencoder (frozen, not stored in this
            method's checkpoints).
        transformer: the prior network; its ``vocab_size`` must be the autoencoder's codebook size
            and its ``side`` the autoencoder's token grid side.
        text_encoder: the injected text encoder (cross-attention conditioning), trained with the
            prior; None when the caption is in the token stream.
        cond_drop_prob: probability of replacing a caption by "" (classifier-free guidance).
        optimizer, lr_scheduler: factories; the optimizer gets two parameter groups (see
            :func:`decay_groups`), its ``weight_decay`` applies to the first.
    """

    def __init__(
        self,
        autoencoder: str,
        transformer: nn.Module,
        text_encoder: nn.Module | None = None,
        cond_drop_prob: float = 0.1,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        ae = self.attach_autoencoder(autoencoder, vq=True)
        option = "model.init_args.transformer.init_args"
        if transformer.vocab_size != ae.codebook_size:
            raise ConfigError(
                f"{option}.vocab_size is {transformer.vocab_size} but the autoencoder {autoencoder!r} has "
                f"{ae.codebook_size} codes: set vocab_size to {ae.codebook_size}"
            )
        side = ae.latent_shape[-1]
        if transformer.side != side:
            raise ConfigError(
                f"{option}.side is {transformer.side} but the autoencoder {autoencoder!r} makes a {side} x {side} "
                f"token grid ({ae.image_size} px / {ae.downsample_factor}): set side to {side}"
            )
        self.transformer, self.text_encoder = transformer, text_encoder
        self.side, self.num_tokens = side, side * side
        self.cond_drop_prob = cond_drop_prob
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    @property
    def image_size(self) -> int:
        return self.autoencoder.image_size

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def tokens_of(self, batch: dict) -> Tensor:
        """(b, n) image tokens in raster order: the batch's pre-computed ones or the autoencoder's."""
        if "tokens" in batch:
            return batch["tokens"].to(self.device).long().flatten(1)
        return self.autoencoder.encode(batch["image"])[1].flatten(1)

    def dropped_captions(self, captions: list[str], p: float) -> list[str]:
        drop = (torch.rand(len(captions)) < p).tolist()
        return ["" if d else c for c, d in zip(captions, drop)]

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        return self.autoencoder.decode_indices(tokens.view(-1, self.side, self.side)).clamp(-1, 1)

    # ------------------------------------------------------------------ training
    def losses(self, batch: dict, cond_drop_prob: float) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.losses(batch, self.cond_drop_prob)
        b = len(batch["caption"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=b)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss`` and ``val/token_accuracy`` with the captions kept and the random draws
        (MaskGIT's masks) fixed per batch, so that validations compare."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            out = self.losses(batch, 0.0)
        self.log_dict(
            {f"val/{k}": v for k, v in out.items()}, sync_dist=True, batch_size=len(batch["caption"])
        )

    def configure_optimizers(self):
        modules = nn.ModuleList(
            [self.transformer] + ([self.text_encoder] if self.text_encoder is not None else [])
        )
        return self.optimizer_with_scheduler(
            self.optimizer_factory(decay_groups(modules)), self.lr_scheduler_factory
        )

    # ------------------------------------------------------------------ sampling
    guided = staticmethod(guided_logits)


class AutoregressivePrior(TokenPrior):
    """An autoregressive transformer over raster-order image tokens (DALL-E, Taming, Parti).

    With ``stream`` conditioning (``networks.transformer.TokenTransformer``) the caption's token
    ids come first in the sequence and the loss is ``text_loss_weight * caption CE +
    image_loss_weight * image CE`` (DALL-E: 1/8 and 7/8); with ``cross`` the transformer
    cross-attends to ``text_encoder``'s token embeddings and only image tokens are predicted.

    Args:
        tokenizer: the caption tokenizer of ``stream`` conditioning: ``byte`` or ``bpe``.
        text_loss_weight, image_loss_weight: loss weights of the two parts (``stream``).
        temperature, top_k, top_p, guidance_scale: defaults of ``generate``.
        **kwargs: the :class:`TokenPrior` options.
    """

    def __init__(
        self,
        autoencoder: str,
        transformer: nn.Module,
        text_encoder: nn.Module | None = None,
        tokenizer: str = "byte",
        text_loss_weight: float = 0.125,
        image_loss_weight: float = 0.875,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 3.0,
        **kwargs,
    ):
        super().__init__(autoencoder, transformer, text_encoder, **kwargs)
        self.save_hyperparameters()
        self.stream = transformer.conditioning == "stream"
        if self.stream:
            if tokenizer not in ("byte", "bpe"):
                raise ConfigError(f"model.init_args.tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
            self.tokenizer = ByteTokenizer() if tokenizer == "byte" else BPETokenizer()
            if self.tokenizer.vocab_size != transformer.text_vocab_size:
                raise ConfigError(
                    f"the {tokenizer} tokenizer has {self.tokenizer.vocab_size} tokens but "
                    f"model.init_args.transformer.init_args.text_vocab_size is {transformer.text_vocab_size}: "
                    f"set it to {self.tokenizer.vocab_size}"
                )
        elif text_encoder is None:
            raise ConfigError(
                "cross-attention conditioning needs model.init_args.text_encoder "
                "(or set the transformer's conditioning: stream)"
            )
        elif getattr(text_encoder, "dim", None) not in (None, transformer.blocks[0].cross.kv.in_features):
            raise ConfigError(
                f"the text encoder gives {text_encoder.dim}-d tokens but the transformer's context_dim is "
                f"{transformer.blocks[0].cross.kv.in_features}: set context_dim to {text_encoder.dim}"
            )
        self.text_loss_weight, self.image_loss_weight = text_loss_weight, image_loss_weight
        self.sampling_defaults = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "guidance_scale": guidance_scale,
        }

    def condition(self, captions: list[str]) -> dict:
        """The transformer's text inputs: caption ids (``stream``) or the text encoding (``cross``)."""
        if self.stream:
            ids = self.tokenizer(list(captions), self.transformer.text_length).to(self.device)
            return {"text_ids": ids}
        return {"text": self.text_encoder(list(captions))}

    def losses(self, batch: dict, cond_drop_prob: float) -> dict[str, Tensor]:
        tokens = self.tokens_of(batch)
        captions = self.dropped_captions(list(batch["caption"]), cond_drop_prob)
        cond = self.condition(captions)
        logits, text_logits = self.transformer(tokens, **cond)
        image_loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        accuracy = (logits.argmax(-1) == tokens).float().mean()
        out = {"image_loss": image_loss, "token_accuracy": accuracy}
        if text_logits is None:
            out["loss"] = image_loss
            return out
        targets = cond["text_ids"][:, 1:]
        text_loss = F.cross_entropy(
            text_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0
        )  # 0: pad
        out["text_loss"] = text_loss
        out["loss"] = self.text_loss_weight * text_loss + self.image_loss_weight * image_loss
        return out

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_tokens(
        self,
        prompts: list[str],
        generator: Generators,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        guidance_scale: float,
        use_cache: bool = True,
    ) -> Tensor:
        """(b, n) tokens, one at a time (:func:`networks.transformer.sample_autoregressive`)."""
        guide = guidance_scale != 1.0
        cond = self.condition(list(prompts) + ([""] * len(prompts) if guide else []))
        return sample_autoregressive(
            self.transformer,
            cond.get("text_ids"),
            cond.get("text"),
            generator,
            temperature,
            top_k,
            top_p,
            guidance_scale,
            use_cache,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        use_cache: bool = True,
        **unknown,
    ) -> Tensor:
        """Images for ``prompts``: tokens sampled one at a time (with a KV cache unless
        ``use_cache`` is False) with temperature, top-k, top-p and classifier-free guidance, then
        decoded. The same seed gives the same tokens, with or without the cache."""
        self.check_sampling(unknown)
        d = self.sampling_defaults
        tokens = self.sample_tokens(
            list(prompts),
            self.generator(seed, self.device),
            d["temperature"] if temperature is None else temperature,
            d["top_k"] if top_k is None else top_k,
            d["top_p"] if top_p is None else top_p,
            d["guidance_scale"] if guidance_scale is None else guidance_scale,
            use_cache,
        )
        return self.decode_tokens(tokens)


class MaskGITPrior(TokenPrior):
    """MaskGIT: a bidirectional transformer (``networks.transformer.MaskedTokenTransformer``)
    trained to predict masked image tokens, a cosine fraction ``cos(pi/2 r)`` of them masked with
    ``r ~ U(0, 1)``; decoded in ``steps`` parallel steps, each keeping the most confident of its
    sampled tokens and masking the rest again, fewer each step along the same schedule.

    Args:
        steps, temperature, choice_temperature, guidance_scale: defaults of ``generate``;
            ``choice_temperature`` scales the Gumbel noise on the confidences (annealed to 0 at
            the last step), MaskGIT's 4.5.
        **kwargs: the :class:`TokenPrior` options (``text_encoder`` is required).
    """

    def __init__(
        self,
        autoencoder: str,
        transformer: nn.Module,
        text_encoder: nn.Module,
        steps: int = 12,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        guidance_scale: float = 3.0,
        **kwargs,
    ):
        super().__init__(autoencoder, transformer, text_encoder, **kwargs)
        self.save_hyperparameters()
        self.sampling_defaults = {"steps": steps, "temperature": temperature,
                                  "choice_temperature": choice_temperature, "guidance_scale": guidance_scale}  # fmt: skip

    def random_mask(self, b: int) -> Tensor:
        """(b, n) bool, True where masked: ``ceil(cos(pi/2 r) n)`` random positions, at least one."""
        n = self.num_tokens
        r = torch.rand(b, device=self.device)
        count = (mask_ratio(r) * n).ceil().clamp(1, n)
        scores = torch.rand(b, n, device=self.device)
        rank = scores.argsort(-1).argsort(-1)  # each position's rank among its row's scores
        return rank < count[:, None]

    def losses(self, batch: dict, cond_drop_prob: float) -> dict[str, Tensor]:
        tokens = self.tokens_of(batch)
        captions = self.dropped_captions(list(batch["caption"]), cond_drop_prob)
        text = self.text_encoder(captions)
        mask = self.random_mask(tokens.shape[0])
        inputs = tokens.masked_fill(mask, self.transformer.mask_id)
        logits = self.transformer(inputs, text).float()
        loss = F.cross_entropy(logits[mask], tokens[mask])
        accuracy = (logits.argmax(-1) == tokens)[mask].float().mean()
        return {"loss": loss, "token_accuracy": accuracy}

    @torch.no_grad()
    def sample_tokens(
        self, prompts: list[str], generator: Generators, steps: int, temperature: float,
        choice_temperature: float, guidance_scale: float, history: list | None = None,
    ) -> Tensor:  # fmt: skip
        """(b, n) tokens in ``steps`` parallel steps; ``history`` (a list) receives the number of
        tokens still masked in each row after each step."""
        b, n, mask_id = len(prompts), self.num_tokens, self.transformer.mask_id
        guide = guidance_scale != 1.0
        text = self.text_encoder(list(prompts) + ([""] * b if guide else []))
        tokens = torch.full((b, n), mask_id, dtype=torch.long, device=self.device)
        schedule = masked_per_step(n, steps)
        for step in range(steps):
            masked = tokens == mask_id
            inputs = torch.cat([tokens, tokens]) if guide else tokens
            logits = self.transformer(inputs, text).float()
            if guide:
                logits = self.guided(logits, guidance_scale)
            sampled = sample_from_logits(logits, generator, temperature)  # (b, n)
            sampled = torch.where(masked, sampled, tokens)
            log_probs = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            noise = choice_noise(step, steps, choice_temperature)
            confidence = log_probs + noise * gumbel((b, n), generator, self.device)
            confidence = confidence.masked_fill(~masked, float("inf"))  # decided tokens stay
            still = masked.sum(-1)
            keep_masked = torch.minimum(torch.full_like(still, schedule[step]), (still - 1).clamp_min(0))
            if step == steps - 1:
                keep_masked = torch.zeros_like(still)
            rank = confidence.argsort(-1).argsort(-1)  # 0 = least confident
            remask = rank < keep_masked[:, None]
            tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
            if history is not None:
                history.append((tokens == mask_id).sum(-1).tolist())
        return tokens

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        choice_temperature: float | None = None,
        guidance_scale: float | None = None,
        **unknown,
    ) -> Tensor:
        """Images for ``prompts`` in ``steps`` parallel decoding steps, then decoded."""
        self.check_sampling(unknown)
        d = self.sampling_defaults
        tokens = self.sample_tokens(
            list(prompts),
            self.generator(seed, self.device),
            d["steps"] if steps is None else steps,
            d["temperature"] if temperature is None else temperature,
            d["choice_temperature"] if choice_temperature is None else choice_temperature,
            d["guidance_scale"] if guidance_scale is None else guidance_scale,
        )
        return self.decode_tokens(tokens)
