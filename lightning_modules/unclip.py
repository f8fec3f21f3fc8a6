"""unCLIP (DALL-E 2): a diffusion prior from a caption to a CLIP image embedding, and a pixel
diffusion decoder from that embedding (and the caption) to the image.

- :class:`UnCLIPPrior` trains ``networks.unclip.DiffusionPrior`` to predict the clean image
  embedding (x0) of the frozen CLIP from the caption's token encodings and text embedding.
  Embeddings are l2-normalised and scaled by ``sqrt(d)`` (unit variance per dimension, as in the
  paper); sampling draws ``candidates`` embeddings per caption and keeps the one most similar to
  the caption's text embedding (the paper's best of 2).
- :class:`UnCLIPDecoder` is the pixel diffusion of :mod:`lightning_modules.diffusion` with one
  more condition: the image embedding, projected and added to the timestep embedding and turned
  into ``image_embed_tokens`` extra context tokens beside the caption's. Training drops the
  embedding (``image_drop_prob``, 10%) and the caption (``cond_drop_prob``, 50%) independently;
  guidance's unconditional branch has neither.
- :class:`UnCLIP` joins a trained prior and decoder for ``generate`` (the standard contract),
  image ``variations`` and ``interpolate`` between two images' embeddings.

The CLIP is loaded from its checkpoint path, frozen, kept in eval mode and out of this module's
checkpoints, which store the path and the CLIP's lineage (``frozen_clip_lineage``): a checkpoint
whose path now holds a CLIP of another lineage is refused when loaded. Prior and decoder must use
the same CLIP; :class:`UnCLIP` then holds one copy of it.
"""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from networks.diffusion import SAMPLERS, NoiseSchedule, Sampler, Schedule, rescale_guidance
from networks.errors import ConfigError, MissingFileError
from networks.frozen import keep_out_of_checkpoints
from networks.noise import offset, randn, seeded
from networks.text_encoders import TextEncoding
from networks.unclip import DiffusionPrior

from .base import BaseModule, TextToImageModule
from .clip import CLIP, load_clip
from .diffusion import TextToImageDiffusion
from .ema import ema_decay, ema_update


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)


def describe_lineage(lineage: dict | None) -> str:
    """A CLIP's lineage in words: ``origin <id>`` and the checkpoints (``origin@step``) it was
    resumed, fine-tuned or loaded from."""
    if not lineage or lineage.get("origin") is None:
        return "no recorded origin (a CLIP from before lineage was recorded)"
    resumed = lineage.get("resumed") or []
    return f"origin {lineage['origin']}" + (f" (checkpoints {', '.join(resumed)})" if resumed else "")


class FrozenCLIPUser:
    """Mixin of the modules that build on a trained CLIP: loaded frozen from its path, in eval
    mode whatever mode the module is put in, its weights out of the module's checkpoints. The
    checkpoints record the CLIP's lineage (``frozen_clip_lineage``); loading one whose CLIP path
    now holds a CLIP of another lineage raises a ConfigError (a checkpoint from before the lineage
    was recorded loads with a warning)."""

    def attach_clip(self, path: str, option: str = "model.init_args.clip", clip: CLIP | None = None) -> CLIP:
        """The CLIP at ``path`` (or ``clip``, already loaded from it) as ``self.clip``. The path is kept
        as ``clip_path``: ``hparams`` may not be this module's own when it is built inside another
        module that the CLI instantiates (``UnCLIP``)."""
        self.clip = keep_out_of_checkpoints(clip if clip is not None else load_clip(path, option=option))
        self.clip_path = path
        return self.clip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frozen_clip_lineage"] = copy.deepcopy(self.clip.lineage)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        name, path = type(self).__name__, self.clip_path
        if "frozen_clip_lineage" not in checkpoint:
            rank_zero_warn(
                f"this {name} checkpoint predates the recorded CLIP lineage: it cannot be checked that the CLIP "
                f"at {path} is the one it was trained on"
            )
            return
        recorded = checkpoint["frozen_clip_lineage"]
        if recorded != self.clip.lineage:
            raise ConfigError(
                f"this {name} was trained on the CLIP at {path} of {describe_lineage(recorded)}, but {path} now "
                f"holds a CLIP of {describe_lineage(self.clip.lineage)}: give the CLIP it was trained on "
                f"(model.init_args.clip, or load_from_checkpoint(..., clip=<path>)), or train the {name} again "
                "on this CLIP"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "clip", None) is not None:
            self.clip.eval()  # frozen: dropout stays off
        return self

    @property
    def embed_dim(self) -> int:
        """CLIP's joint embedding size (its projection's, or the towers' own when it has none)."""
        proj = self.clip.text_proj
        return proj.out_features if isinstance(proj, nn.Linear) else self.clip.text_tower.dim

    @torch.no_grad()
    def clip_text(self, captions: list[str]) -> tuple[TextEncoding, Tensor]:
        """The caption's token encodings (CLIP's text tower) and its unit text embedding."""
        tower = self.clip.text_tower(list(captions))
        embed = F.normalize(self.clip.text_proj(tower.pooled).float(), dim=-1)
        return tower, embed

    @torch.no_grad()
    def clip_image(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> unit CLIP image embeddings (b, d)."""
        return self.clip.encode_image(images)

    def batch_image_embed(self, batch: dict) -> Tensor:
        """The unit CLIP image embeddings of a batch: pre-computed into the shards
        (``batch["clip_image_embed"]``, ``scripts/embed_shards.py``) or of its images."""
        if "clip_image_embed" in batch:
            return F.normalize(batch["clip_image_embed"].float(), dim=-1)
        return self.clip_image(batch["image"])


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (b, d) at ``w`` in [0, 1]."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - w) * omega) / so) * a + (torch.sin(w * omega) / so) * b


class UnCLIPPrior(FrozenCLIPUser, BaseModule):
    """The diffusion prior: caption -> CLIP image embedding.

    Args:
        clip: checkpoint of the trained CLIP whose embeddings the prior predicts (frozen).
        width, depth, heads: the causal transformer (``networks.unclip.DiffusionPrior``).
        timesteps: training timesteps ``T``.
        schedule: noise schedule (the paper's prior: cosine).
        cond_drop_prob: probability of replacing a caption by "" (classifier-free guidance).
        ema_decay: decay of the EMA of the network (the weights that sample).
        candidates: embeddings drawn per caption at sampling; the one with the highest cosine
            similarity to the caption's text embedding is kept (the paper: 2).
        sampler, sample_steps: sampler (``ddim`` or ``dpmpp_2m``, ``ddpm``) and its steps (the paper: 64).
        guidance_scale: classifier-free guidance of the prior (1: none).
    """

    def __init__(
        self,
        clip: str,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        timesteps: int = 1000,
        schedule: Schedule = "cosine",
        cond_drop_prob: float = 0.1,
        ema_decay: float = 0.999,
        candidates: int = 2,
        sampler: Sampler = "ddim",
        sample_steps: int = 64,
        guidance_scale: float = 1.0,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if candidates < 1:
            raise ConfigError(f"model.init_args.candidates is {candidates}: draw at least 1 embedding per caption")
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.init_args.sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        clip_model = self.attach_clip(clip)
        token_dim, max_tokens = clip_model.text_tower.dim, getattr(clip_model.text_tower, "max_length", 77)
        self.network = DiffusionPrior(self.embed_dim, token_dim, width, depth, heads, max_tokens)
        self.ema_network = copy.deepcopy(self.network).requires_grad_(False).eval()
        self.schedule = NoiseSchedule(timesteps, schedule)
        self.scale = math.sqrt(self.embed_dim)  # unit-norm embeddings -> unit variance per dimension
        self.cond_drop_prob, self.ema_decay = cond_drop_prob, ema_decay
        self.sampling_defaults = {"candidates": candidates, "sampler": sampler, "steps": sample_steps,
                                  "guidance_scale": guidance_scale}  # fmt: skip
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict, cond_drop_prob: float | None = None, use_ema: bool = False) -> Tensor:
        """MSE between the predicted and the true scaled image embedding at random timesteps."""
        captions = list(batch["caption"])
        drop = torch.rand(len(captions)) < (self.cond_drop_prob if cond_drop_prob is None else cond_drop_prob)
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = self.batch_image_embed(batch) * self.scale
        text, text_embed = self.clip_text(captions)
        t = torch.randint(0, self.schedule.timesteps, (len(captions),), device=x0.device)
        noised = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        network = self.ema_network if use_ema else self.network
        predicted = network(noised, t, text.tokens, text.mask, text_embed * self.scale)
        return F.mse_loss(predicted.float(), x0)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss`` of the EMA network on fixed draws per batch; ``val/similarity``: the mean
        cosine similarity of a sampled embedding (best of ``candidates``) to the true one."""
        b = len(batch["caption"])
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            self.log("val/loss", self.loss(batch, cond_drop_prob=0.0, use_ema=True), sync_dist=True, batch_size=b)
        if batch_idx == 0:
            true = self.batch_image_embed(batch)
            sampled = self.sample(list(batch["caption"]), seed=list(range(b)), steps=16)
            self.log("val/similarity", (true * sampled).sum(-1).mean(), sync_dist=True, batch_size=b)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update(self.ema_network, self.network, ema_decay(self.ema_decay, self.global_step))

    def configure_optimizers(self):
        return self.optimizer_with_scheduler(self.optimizer_factory(self.network.parameters()),
                                             self.lr_scheduler_factory)  # fmt: skip

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        *,
        seed: int | list[int] | None = None,
        candidates: int | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        return_candidates: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Unit image embeddings (b, d), each the best of ``candidates`` draws by cosine similarity
        to its caption's text embedding; with ``return_candidates`` also every draw (b, k, d).
        ``seed`` (an int, or one per caption) fixes the draws of each caption."""
        d = self.sampling_defaults
        k = candidates or d["candidates"]
        sampler, steps = sampler or d["sampler"], steps or d["steps"]
        scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        b, dim = len(captions), self.embed_dim
        network = self.ema_network if use_ema else self.network
        # the captions (and for guidance the empty caption after them), each repeated per candidate
        text, embeds = self.clip_text(list(captions) + ([""] * b if scale != 1.0 else []))
        text_embed = embeds[:b]
        tokens, mask, cond = (x.repeat_interleave(k, 0) for x in (text.tokens, text.mask, embeds * self.scale))

        def denoise(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if scale == 1.0:
                x0 = network(x, t, tokens, mask, cond)
            else:
                c, u = network(torch.cat([x, x]), torch.cat([t, t]), tokens, mask, cond).chunk(2)
                x0 = rescale_guidance(u + scale * (c - u), c, 0.0)
            return self.schedule.to_x0_eps("x0", x0, x, t)

        generator = seeded(seed, self.device)
        noise = randn((b, k * dim), generator, device=self.device).view(b * k, dim)  # each caption's from its seed
        if isinstance(generator, list):  # a stochastic sampler's draws for a candidate: from its caption's generator
            generator = [g for g in generator for _ in range(k)]
        drawn = SAMPLERS[sampler](denoise, self.schedule, noise, steps=steps, generator=generator)
        drawn = F.normalize(drawn.float(), dim=-1).view(b, k, dim)
        best = (drawn * text_embed[:, None]).sum(-1).argmax(1)
        chosen = drawn[torch.arange(b), best]
        return (chosen, drawn) if return_candidates else chosen


class ImageEmbeddingConditioned(nn.Module):
    """A text-conditional denoiser (``UNet``) that also reads a CLIP image embedding: the
    embedding is projected onto the pooled text vector (which the UNet adds to its timestep
    embedding) and into ``tokens`` extra context tokens after the caption's. A sample whose
    ``image_keep`` is False gets neither (its extra tokens are masked out), so with the empty
    caption it is exactly the unconditional denoiser.

    Args:
        denoiser: the network ``(x, t, TextEncoding, **extra)``; its ``context_dim`` (or the
            pooled width) is the width of the extra tokens.
        embed_dim: the CLIP embedding size.
        context_dim: width of the text tokens the denoiser reads.
        tokens: extra context tokens (the paper: 4).
    """

    def __init__(self, denoiser: nn.Module, embed_dim: int, context_dim: int, tokens: int = 4):
        super().__init__()
        self.denoiser, self.tokens, self.context_dim = denoiser, tokens, context_dim
        self.to_pooled = nn.Linear(embed_dim, context_dim)
        self.to_tokens = nn.Linear(embed_dim, tokens * context_dim)
        self.in_channels = getattr(denoiser, "in_channels", 3)

    def forward(self, x: Tensor, t: Tensor, text: TextEncoding, image_embed: Tensor, image_keep: Tensor,
                **extra) -> Tensor:  # fmt: skip
        keep = image_keep.to(x.device).bool()
        e = image_embed.to(self.to_pooled.weight.dtype)
        tokens = self.to_tokens(e).view(len(e), self.tokens, self.context_dim).to(text.tokens.dtype)
        added = self.to_pooled(e).to(text.pooled.dtype) * keep[:, None]  # a dropped embedding adds nothing
        conditioned = TextEncoding(
            torch.cat([text.tokens, tokens], dim=1),
            torch.cat([text.mask.bool(), keep[:, None].expand(-1, self.tokens)], dim=1).to(text.mask.dtype),
            text.pooled + added,
        )
        return self.denoiser(x, t, conditioned, **extra)


class UnCLIPDecoder(FrozenCLIPUser, TextToImageDiffusion):
    """The unCLIP decoder: pixel diffusion conditioned on the caption and a CLIP image embedding.

    Training embeds each batch image with the frozen CLIP (or reads ``batch["clip_image_embed"]``).
    ``generate(prompts, image_embed=...)`` decodes given unit embeddings (b, d); without them it
    embeds nothing and raises (use :class:`UnCLIP` to generate from text alone).

    Args:
        denoiser: the pixel denoiser (``networks.unet.UNet``), wrapped in :class:`ImageEmbeddingConditioned`.
        text_encoder: the caption's encoder (as for pixel diffusion).
        clip: checkpoint of the CLIP whose image embeddings condition the decoder (frozen).
        image_embed_tokens: extra context tokens made from the embedding (the paper: 4).
        image_drop_prob: probability of dropping the embedding in training (the paper: 10%).
        cond_drop_prob: probability of dropping the caption in training (the paper: 50%).
        **kwargs: the other :class:`TextToImageDiffusion` arguments (pixel space only).
    """

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module, clip: str, image_embed_tokens: int = 4,
                 image_drop_prob: float = 0.1, cond_drop_prob: float = 0.5, **kwargs):  # fmt: skip
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # the CLI's records (_class_path)
        if kwargs.get("autoencoder") is not None:
            raise ConfigError("the unCLIP decoder works in pixel space: remove model.init_args.autoencoder")
        clip_model = load_clip(clip, option="model.init_args.clip")
        context_dim = getattr(text_encoder, "dim", None) or denoiser.pooled_embed.in_features
        embed_dim = clip_model.encode_text([""]).shape[-1]
        wrapped = ImageEmbeddingConditioned(denoiser, embed_dim, context_dim, image_embed_tokens)
        super().__init__(wrapped, text_encoder, cond_drop_prob=cond_drop_prob, **kwargs)
        self.attach_clip(clip, clip=clip_model)
        self.image_drop_prob = image_drop_prob

    def conditioning(self, batch: dict) -> dict:
        """The image embedding of each batch image, dropped with ``image_drop_prob`` in training."""
        embed = self.batch_image_embed(batch)
        b = embed.shape[0]
        keep = torch.rand(b) >= self.image_drop_prob if self.training else torch.ones(b, dtype=torch.bool)
        return {"image_embed": embed, "image_keep": keep.to(embed.device)}

    def unconditional(self, cond: dict) -> dict:
        """Guidance's unconditional branch: no image embedding (and, as always, the empty caption)."""
        return {**cond, "image_keep": torch.zeros_like(cond["image_keep"])}

    def denoiser_inputs(self, batch_size: int, seed: int | list[int] | None, options: dict) -> dict:
        """``generate(prompts, image_embed=...)``: unit CLIP image embeddings (b, d) to decode."""
        options = dict(options)
        embed = options.pop("image_embed", None)
        self.check_sampling(options)
        if embed is None:
            raise NotImplementedError(
                "the unCLIP decoder needs image_embed (CLIP image embeddings); use lightning_modules.unclip.UnCLIP "
                "(prior and decoder) to generate from text alone"
            )
        if embed.shape != (batch_size, self.embed_dim):
            raise ValueError(f"image_embed is {tuple(embed.shape)}, expected ({batch_size}, {self.embed_dim})")
        embed = F.normalize(embed.to(self.device).float(), dim=-1)
        return {"image_embed": embed, "image_keep": torch.ones(batch_size, dtype=torch.bool, device=self.device)}

    def sampling_options(self) -> tuple[str, ...]:
        return ("image_embed", *super().sampling_options())


class UnCLIP(TextToImageModule):
    """A trained prior and decoder, for ``predict`` and evaluation (train each with its config).

    Args:
        prior: checkpoint of an :class:`UnCLIPPrior`.
        decoder: checkpoint of an :class:`UnCLIPDecoder` on the same CLIP.
        prior_sampling: options of the prior's ``sample`` (candidates, sampler, steps, guidance_scale).
        decoder_sampling: ``generate`` options of the decoder (sampler, steps, guidance_scale, ...).
    """

    def __init__(self, prior: str, decoder: str, prior_sampling: dict | None = None,
                 decoder_sampling: dict | None = None):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.prior = _load(UnCLIPPrior, prior, "prior", "candidates", "configs/unclip/prior_shapes.yaml")
        self.decoder = _load(UnCLIPDecoder, decoder, "decoder", "image_embed_tokens", "configs/unclip/decoder_shapes.yaml")
        if not _same_clip(self.prior, self.decoder):
            raise ConfigError(
                f"the prior ({prior}) and the decoder ({decoder}) were trained on different CLIPs "
                f"({self.prior.clip_path}, {describe_lineage(self.prior.clip.lineage)}; {self.decoder.clip_path}, "
                f"{describe_lineage(self.decoder.clip.lineage)}): train both on the same one"
            )
        self.decoder.clip = self.prior.clip  # one CLIP: counted and held once
        self.prior_sampling, self.decoder_sampling = dict(prior_sampling or {}), dict(decoder_sampling or {})
        unknown = set(self.prior_sampling) - {"candidates", "sampler", "steps", "guidance_scale"}
        if unknown:
            raise ConfigError(f"model.init_args.prior_sampling: unknown {', '.join(sorted(unknown))}; the options are "
                              "candidates, sampler, steps, guidance_scale")  # fmt: skip
        self.decoder.check_sampling(self.decoder_sampling)

    @property
    def clip(self) -> CLIP:
        return self.decoder.clip

    def sampling_options(self) -> tuple[str, ...]:
        return tuple(o for o in self.decoder.sampling_options() if o != "image_embed")

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int | list[int] | None = None, **sampling) -> Tensor:
        """The prior's embedding for each prompt (best of its candidates), then the decoder: (b, 3, h, w)."""
        self.check_sampling(sampling)
        embed = self.prior.sample(list(prompts), seed=seed, **self.prior_sampling)
        return self.decode(list(prompts), embed, seed, sampling)

    def decode(self, prompts: list[str], embed: Tensor, seed, sampling: dict | None = None) -> Tensor:
        options = {**self.decoder_sampling, **(sampling or {})}
        return self.decoder.generate(prompts, seed=offset(seed, 1), image_embed=embed, **options)

    @torch.no_grad()
    def variations(self, images: Tensor, *, seed: int | list[int] | None = None, prompts: list[str] | None = None,
                   **sampling) -> Tensor:  # fmt: skip
        """Images like ``images`` (b, 3, h, w in [-1, 1]): the decoder from their CLIP image
        embeddings, with the empty caption unless ``prompts`` are given."""
        embed = self.clip.encode_image(images.to(self.device))
        return self.decode(prompts or [""] * len(images), embed, seed, sampling)

    @torch.no_grad()
    def interpolate(self, image_a: Tensor, image_b: Tensor, weights: list[float], *, seed: int = 0,
                    prompt: str = "", **sampling) -> Tensor:  # fmt: skip
        """Decoded embeddings along the great circle from ``image_a``'s (3, h, w) to ``image_b``'s,
        one image per weight (0: a, 1: b), all with the same seed."""
        a, b = self.clip.encode_image(torch.stack([image_a, image_b]).to(self.device))
        embed = torch.stack([slerp(a[None], b[None], float(w))[0] for w in weights])
        embed = F.normalize(embed, dim=-1)
        return self.decode([prompt] * len(weights), embed, [seed] * len(weights), sampling)


def _same_clip(prior: UnCLIPPrior, decoder: UnCLIPDecoder) -> bool:
    """Whether prior and decoder were built on the same CLIP: the same lineage, and where that has
    no origin (CLIPs from before lineage was recorded) the same file or the same weights."""
    a, b = prior.clip, decoder.clip
    if a.lineage != b.lineage:
        return False
    if (a.lineage or {}).get("origin") is not None:
        return True
    if os.path.realpath(prior.clip_path) == os.path.realpath(decoder.clip_path):
        return True
    ta = dict(a.named_parameters()) | dict(a.named_buffers())  # not state_dict: the CLIP keeps out of those
    tb = dict(b.named_parameters()) | dict(b.named_buffers())
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _load(cls, path: str, option: str, key: str, config: str):
    """A trained prior or decoder from its checkpoint, frozen and in eval mode; a clear error for a
    missing file or another model's checkpoint (recognised by a hyperparameter only ``cls`` has)."""
    if not path or not os.path.isfile(path):
        raise MissingFileError(f"model.init_args.{option}: checkpoint {path!r} not found: train the {option} first "
                               f"({config}) and give its checkpoints/last.ckpt")  # fmt: skip
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    if key not in hparams:
        raise ConfigError(f"model.init_args.{option}: {path!r} is not an {cls.__name__} checkpoint "
                          f"({hparams.get('_class_path', 'no model class recorded')}); train one with {config}")  # fmt: skip
    try:
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except ConfigError as err:  # its CLIP is not the one it was trained on: say which option
        raise ConfigError(f"model.init_args.{option}: {path}: {err}") from None
    return model.requires_grad_(False).eval()


__all__ = ["ImageEmbeddingConditioned", "UnCLIP", "UnCLIPDecoder", "UnCLIPPrior", "describe_lineage", "slerp"]
