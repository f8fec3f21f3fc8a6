"""Text-conditional diffusion: DDPM training with classifier-free guidance, EMA, fast samplers,
Imagen-style frozen text encoders, optional layout conditioning (GLIGEN's boxes and phrases), and
a super-resolution stage for cascades."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.text_image import pad_layouts
from networks.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    Prediction,
    Sampler,
    Schedule,
    dynamic_threshold,
    rescale_guidance,
)
from networks.errors import ConfigError
from networks.noise import Generators, offset, randn
from networks.text_encoders import TextEncoding

from .autoencoder import FrozenAutoencoderUser
from .base import TextToImageModule
from .ema import ema_decay, ema_update


def _adamw(params):
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)  # one kernel over all parameters


class TextToImageDiffusion(FrozenAutoencoderUser, TextToImageModule):
    """A denoiser trained to reverse a noise schedule, conditioned on a text encoder; in pixel
    space, or in the latent space of a frozen autoencoder (latent diffusion).

    Latent diffusion (``autoencoder`` set): training encodes the images (the KL autoencoder's
    posterior mean, a VQ autoencoder's pre-quantisation latents) and multiplies them by
    ``latent_scale``, estimated as ``1 / std`` of the first training batch's latents (averaged
    over ranks) unless given, and saved in the checkpoint, so a resumed run keeps it. Latents
    have no fixed range, so nothing clamps them: the schedule and target must keep the predicted
    latents well conditioned (eps on the scaled-linear schedule, or v-prediction on a
    zero-terminal-SNR one; BENCHMARKS.md measures why eps on the cosine schedule does not). ``generate`` samples latents and
    decodes ``latents / latent_scale``.

    Args:
        denoiser: network ``(x_t, t, TextEncoding, ...) -> prediction`` (e.g. ``networks.unet.UNet``).
        text_encoder: trainable (trained with the denoiser) or frozen (no trainable parameters).
        image_size: side of generated images.
        timesteps: training timesteps ``T``.
        schedule: ``linear``, ``cosine`` or ``scaled_linear`` (latent diffusion's). None: the
            measured default of the space (BENCHMARKS.md, "Parameterisation"): ``cosine`` in
            pixel space, ``scaled_linear`` in latent space.
        zero_terminal_snr: rescale the schedule to zero SNR at its last step (Lin et al.); needs
            ``prediction: v`` (or ``x0``). None: on in pixel space with a prediction other than
            eps, off in latent space.
        prediction: the network's target: ``eps``, ``x0`` or ``v``. None: ``v`` in pixel space,
            ``eps`` in latent space.
        min_snr_gamma: min-SNR-gamma loss weighting; None for the plain MSE.
        cond_drop_prob: probability of replacing a caption by "" (classifier-free guidance).
        ema_decay: decay of the EMA of the denoiser (and of a trainable text encoder).
        optimizer: optimizer factory for the trainable parameters.
        lr_scheduler: optional scheduler factory, stepped every training step.
        sampler: default sampler of ``generate``: ``ddpm``, ``ddim`` or ``dpmpp_2m``.
        sample_steps: default number of sampling steps.
        guidance_scale: default classifier-free guidance scale (1 = conditional only).
        guidance_rescale: default CFG rescale (Lin et al.; 0: none, the paper's 0.7 with a
            zero-terminal-SNR schedule).
        dynamic_threshold: Imagen dynamic-thresholding percentile (e.g. 0.995); None disables.
        clip_denoised: static thresholding: clamp every predicted x0 to the pixels' [-1, 1] (when
            no dynamic threshold is set). With eps-prediction the x0 implied at the noisiest steps
            is ``(x - sigma * eps) / alpha`` with ``alpha`` near 0, and the clamp keeps it in range.
            None: on in pixel space; latent diffusion has no range to clamp to (an error).
        autoencoder: checkpoint path of a trained KL or VQ autoencoder: diffusion in its latent
            space (frozen, not stored in this method's checkpoints). None: pixel space.
        latent_scale: the latents' scale factor; None estimates it on the first training batch.
        latent_sample: train on draws from a KL autoencoder's posterior instead of its mean
            (CompVis's latent diffusion); validation encodes the mean.
        layout_drop_prob: with a layout-conditioned denoiser (``UNet(layout=...)``), the
            probability of training a sample without its layout (so that ``generate`` without one
            still works); a sample whose caption is dropped loses its layout too, so guidance's
            unconditional branch (no caption, no layout) is trained at ``cond_drop_prob``.

    Layouts: a layout-conditioned denoiser needs batches with ``boxes`` (b, m, 4) in [0, 1],
    ``box_phrases`` (b lists of m phrases, "" where padded) and ``box_mask`` (b, m) bool
    (``ShapesDataModule(layouts=True)``); each phrase becomes the pooled output of the model's own
    text encoder. ``generate(prompts, layout=...)`` takes one ``[(phrase, box), ...]`` per prompt,
    or ``"plan"`` (``recaption.plan_layout`` of each shapes caption); without it the model samples
    from the caption alone, as a layout-free model does.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        text_encoder: nn.Module,
        image_size: int = 32,
        timesteps: int = 1000,
        schedule: Schedule | None = None,
        zero_terminal_snr: bool | None = None,
        prediction: Prediction | None = None,
        min_snr_gamma: float | None = 5.0,
        cond_drop_prob: float = 0.1,
        ema_decay: float = 0.999,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        sampler: Sampler = "dpmpp_2m",
        sample_steps: int = 20,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        dynamic_threshold: float | None = None,
        clip_denoised: bool | None = None,
        autoencoder: str | None = None,
        latent_scale: float | None = None,
        latent_sample: bool = False,
        layout_drop_prob: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= layout_drop_prob <= 1.0:
            raise ConfigError(f"model.init_args.layout_drop_prob must lie in [0, 1], got {layout_drop_prob}")
        self.layout, self.layout_drop_prob = getattr(denoiser, "layout", None), layout_drop_prob
        # the well-conditioned pair of each space unless chosen (a checkpoint keeps None and
        # resolves it the same way): v on a zero-terminal-SNR cosine schedule for pixels, eps on
        # the scaled-linear schedule for latents
        latent = autoencoder is not None
        schedule = schedule or ("scaled_linear" if latent else "cosine")
        prediction = prediction or ("eps" if latent else "v")
        if zero_terminal_snr is None:
            zero_terminal_snr = not latent and prediction != "eps"
        self.autoencoder = None
        self.latent_sample = latent_sample
        if autoencoder is not None:
            ae = self.attach_autoencoder(autoencoder)
            self.check_latent_setup(denoiser, image_size, dynamic_threshold)
            if latent_sample and not hasattr(ae, "posterior"):
                raise ConfigError(
                    f"model.init_args.latent_sample draws latents from a KL autoencoder's posterior, and {autoencoder!r} "
                    f"is a {type(ae).__name__}: leave latent_sample false"
                )
            # 0 until estimated on the first training batch (a buffer, so checkpoints keep it)
            self.register_buffer("latent_scale", torch.tensor(float(latent_scale or 0.0)))
            self._latents_checked = False
            if clip_denoised:
                raise ConfigError(
                    "model.init_args.clip_denoised clamps to the pixels' [-1, 1], which latents do not have: "
                    "leave it unset for latent diffusion and use a well-conditioned schedule, whose predicted "
                    "latents need no clamp (schedule: scaled_linear, as configs/diffusion/latent_shapes.yaml)"
                )
        self.denoiser, self.text_encoder = denoiser, text_encoder
        if zero_terminal_snr and prediction == "eps":
            raise ConfigError(
                "zero_terminal_snr needs prediction: v (or x0): at zero SNR the noise is the whole input, so an "
                "eps-prediction says nothing about the image; set model.init_args.prediction v"
            )
        self.schedule = NoiseSchedule(timesteps, schedule, zero_terminal_snr)
        self.image_size, self.prediction, self.min_snr_gamma = image_size, prediction, min_snr_gamma
        self.cond_drop_prob, self.ema_decay = cond_drop_prob, ema_decay
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.sampling_defaults = {
            "sampler": sampler,
            "steps": sample_steps,
            "guidance_scale": guidance_scale,
            "guidance_rescale": guidance_rescale,
            "dynamic_threshold": dynamic_threshold,
            "clip_denoised": autoencoder is None if clip_denoised is None else clip_denoised,
        }
        self.text_trainable = any(p.requires_grad for p in text_encoder.parameters())
        self.ema_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.ema_text_encoder = (
            copy.deepcopy(text_encoder).requires_grad_(False).eval() if self.text_trainable else None
        )

    # ------------------------------------------------------------------ latent space
    def check_latent_setup(self, denoiser, image_size, dynamic_threshold) -> None:
        ae, option = self.autoencoder, "model.init_args"
        if ae.image_size != image_size:
            raise ConfigError(
                f"{option}.image_size is {image_size} but the autoencoder was trained on {ae.image_size} px images: "
                f"set image_size (and the data's) to {ae.image_size}"
            )
        channels = getattr(denoiser, "in_channels", ae.latent_channels)
        if channels != ae.latent_channels:
            raise ConfigError(
                f"the denoiser takes {channels} channels but the autoencoder's latents have {ae.latent_channels}: "
                f"set {option}.denoiser.init_args.in_channels and out_channels to {ae.latent_channels}"
            )
        if dynamic_threshold is not None:
            raise ConfigError(
                f"{option}.dynamic_threshold rescales to the pixel range [-1, 1], which latents do not have: "
                "leave it unset for latent diffusion"
            )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape the denoiser works on: the image, or the autoencoder's latent."""
        if self.autoencoder is None:
            return (3, self.image_size, self.image_size)
        return self.autoencoder.latent_shape

    @torch.no_grad()
    def to_latents(self, images: Tensor) -> Tensor:
        """Images -> scaled latents; the first training batch sets ``latent_scale`` (if unset). A
        validation before it (Lightning's sanity check) scales by its own batch's spread,
        provisionally, and keeps nothing."""
        if self.latent_sample and self.training:  # a draw from the posterior, as CompVis trains
            z = self.autoencoder.encode(images, sample=True).float()
        else:
            z = self.autoencoder.encode_latents(images).float()
        if not self._latents_checked and not self.training and self.latent_scale == 0:
            return z / z.std().clamp_min(1e-8)
        if not self._latents_checked:  # once: comparing a device tensor on every step would sync
            trainer = self._trainer
            if self.latent_scale == 0:
                var = z.var()
                if trainer is not None and trainer.world_size > 1:  # the same scale on every rank
                    var = trainer.strategy.reduce(var, reduce_op="mean")
                self.latent_scale.fill_(float(1.0 / var.sqrt().clamp_min(1e-8)))
                if trainer is not None:
                    self.print(f"latent_scale {float(self.latent_scale):.4f} (1 / std of the first batch's latents)")
            self._latents_checked = True
        return z * self.latent_scale

    def from_latents(self, latents: Tensor) -> Tensor:
        if self.latent_scale == 0:
            raise RuntimeError(
                "latent_scale is not set: train the model (or give model.init_args.latent_scale) first"
            )
        return self.autoencoder.decode_latents(latents / self.latent_scale)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints from before the latent clamp was removed carry ``latent_bound``: dropped,
        with a warning when the model predicts eps (it was trained to be sampled clamped)."""
        if checkpoint.get("state_dict", {}).pop("latent_bound", None) is not None and self.prediction == "eps":
            rank_zero_warn(
                "this latent-diffusion checkpoint predicts eps and was sampled with its latents clamped to "
                "latent_bound, which no longer exists: its samples may diverge on the cosine schedule. Retrain "
                "with configs/diffusion/latent_shapes.yaml (eps on the scaled-linear schedule)"
            )

    # ------------------------------------------------------------------ training
    def conditioning(self, batch: dict) -> dict:
        """Extra keyword arguments for the denoiser (none here; super-resolution adds its image)."""
        return {}

    def encode(self, captions: list[str], ema: bool = False) -> TextEncoding:
        encoder = self.ema_text_encoder if ema and self.ema_text_encoder is not None else self.text_encoder
        return encoder(captions)

    def training_draws(self, x0: Tensor, cond_drop_prob: float) -> tuple[Tensor, Tensor, list[bool]]:
        """The random draws of one loss evaluation: timesteps (b,), noise like ``x0`` and which
        captions are dropped (classifier-free guidance). From the global RNG, which every rank
        reseeds with a stream of its own at the start of training (``BaseModule``)."""
        b = x0.shape[0]
        drop = (torch.rand(b) < cond_drop_prob).tolist()
        t = torch.randint(0, self.schedule.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        return t, noise, drop

    def loss(self, batch: dict, cond_drop_prob: float | None = None, use_ema: bool = False) -> Tensor:
        """Weighted MSE between the denoiser's output and its target at random timesteps; with
        ``use_ema``, of the EMA weights (the ones that sample)."""
        x0 = batch["image"]
        if x0.shape[-1] != self.image_size:
            raise ValueError(
                f"batch images are {x0.shape[-1]} px but the model makes {self.image_size} px; "
                "set model.init_args.image_size and data image_size to the same value"
            )
        if self.autoencoder is not None:
            x0 = self.to_latents(x0)
        t, noise, drop = self.training_draws(
            x0, self.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
        )
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        text = self.encode(captions, ema=use_ema)
        x_t = self.schedule.add_noise(x0, noise, t)
        denoiser = self.ema_denoiser if use_ema else self.denoiser
        cond = self.conditioning(batch)
        if self.layout is not None:
            cond |= self.batch_layout(batch, drop, cond_drop_prob, use_ema)
        output = denoiser(x_t, t, text, **cond)
        target = self.schedule.target(self.prediction, x0, noise, t)
        per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
        return (per_sample * self.schedule.loss_weight(self.prediction, t, self.min_snr_gamma)).mean()

    def layout_inputs(self, boxes: Tensor, phrases: list[list[str]], mask: Tensor, ema: bool = False) -> dict:
        """The denoiser's layout inputs: boxes (b, m, 4), each phrase's pooled text embedding
        (b, m, d) and the mask (b, m) of real objects."""
        b, m = mask.shape
        flat = [p for row in phrases for p in row] if m else []
        embeds = (
            self.encode(flat, ema=ema).pooled.reshape(b, m, -1)
            if flat
            else torch.zeros(b, m, self.text_encoder.dim, device=self.device)
        )
        return {"boxes": boxes.to(self.device, torch.float32), "box_embeds": embeds,
                "box_mask": mask.to(self.device, torch.bool)}  # fmt: skip

    def batch_layout(
        self, batch: dict, caption_drop: list[bool], cond_drop_prob: float | None, ema: bool
    ) -> dict:
        """A training batch's layout inputs, each sample's layout dropped with its caption and
        otherwise with ``layout_drop_prob`` (none dropped when ``cond_drop_prob`` is 0, as in
        validation)."""
        if "boxes" not in batch:
            raise ConfigError(
                f"the denoiser is layout-conditioned (layout: {self.layout}) and the batch has no boxes: "
                "set data.init_args.layouts true (ShapesDataModule), or the denoiser's layout null"
            )
        p = 0.0 if cond_drop_prob == 0 else self.layout_drop_prob
        # from the global RNG, as training_draws
        drop = torch.tensor(caption_drop) | (torch.rand(len(caption_drop)) < p)
        mask = batch["box_mask"].bool() & ~drop.to(batch["box_mask"].device)[:, None]
        return self.layout_inputs(batch["boxes"], batch["box_phrases"], mask, ema)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss``: the EMA weights, which sample (the best checkpoint is chosen on it);
        ``val/loss_raw``: the live weights. Both on the same noise, timesteps and augmentation,
        fixed per batch so that validations are comparable."""
        b = len(batch["caption"])
        for name, use_ema in (("val/loss", True), ("val/loss_raw", False)):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(batch_idx)
                loss = self.loss(batch, cond_drop_prob=0.0, use_ema=use_ema)
            self.log(name, loss, sync_dist=True, batch_size=b)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: once per optimizer step, so with gradient
        accumulation the EMA horizon stays ``1 / (1 - ema_decay)`` optimizer steps."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step)

    def update_ema(self, step: int) -> None:
        """Move the EMA denoiser (and the EMA of a trainable text encoder) towards the live weights."""
        decay = ema_decay(self.ema_decay, step)
        ema_update(self.ema_denoiser, self.denoiser, decay)
        if self.ema_text_encoder is not None:
            ema_update(self.ema_text_encoder, self.text_encoder, decay)

    def configure_optimizers(self):
        params = [
            p
            for p in list(self.denoiser.parameters()) + list(self.text_encoder.parameters())
            if p.requires_grad
        ]
        return self.optimizer_with_scheduler(self.optimizer_factory(params), self.lr_scheduler_factory)

    # ------------------------------------------------------------------ sampling
    def denoiser_inputs(self, batch_size: int, seed: int | list[int] | None, options: dict) -> dict:
        """Extra denoiser inputs for ``generate`` from the options a subclass adds (none here)."""
        self.check_sampling(options)
        return {}

    def unconditional(self, cond: dict) -> dict:
        """The extra denoiser inputs of guidance's unconditional branch: the same, without the
        layout (the unCLIP decoder drops its image embedding)."""
        if "box_mask" in cond:
            return {**cond, "box_mask": torch.zeros_like(cond["box_mask"])}
        return cond

    def generation_layout(self, prompts: list[str], layout, ema: bool) -> dict:
        """``generate``'s ``layout`` (None, ``"plan"`` or one ``[(phrase, box), ...]`` per prompt)
        -> the denoiser's layout inputs (none for None)."""
        if layout is None:
            return {}
        if self.layout is None:
            raise ValueError(
                "generate(layout=...) needs a layout-conditioned denoiser (UNet layout: tokens or gated)"
            )
        if isinstance(layout, str):
            if layout != "plan":
                raise ValueError(
                    f"generate's layout is None, 'plan' or one [(phrase, box), ...] per prompt, got {layout!r}"
                )
            from datamodules.recaption import plan_layout  # the shapes planner, only when asked for

            layout = [plan_layout(p) for p in prompts]
        if len(layout) != len(prompts):
            raise ValueError(
                f"generate's layout has {len(layout)} entries for {len(prompts)} prompts: give one per prompt"
            )
        boxes, phrases, mask = pad_layouts(layout)
        return self.layout_inputs(boxes, phrases, mask, ema)

    def denoise_fn(
        self, prompts: list[str], guidance_scale: float, threshold: float | None, use_ema: bool, cond: dict,
        clip_denoised: bool = False, guidance_rescale: float = 0.0,
    ):  # fmt: skip
        """The ``(x_t, t) -> (x0, eps)`` function the samplers call, with guidance (and its rescale)
        and thresholding (dynamic with a percentile ``threshold``, else static with ``clip_denoised``)."""
        net = self.ema_denoiser if use_ema else self.denoiser
        text = self.encode(prompts, ema=use_ema)
        null = self.encode([""] * len(prompts), ema=use_ema) if guidance_scale != 1.0 else None
        uncond = self.unconditional(cond)

        def denoise(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if null is None:
                out = net(x, t, text, **cond)
            else:  # one batched pass over conditional and unconditional halves
                both = TextEncoding(*(torch.cat([a, b]) for a, b in zip(text, null)))
                extra = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}
                c, u = net(torch.cat([x, x]), torch.cat([t, t]), both, **extra).chunk(2)
                out = rescale_guidance(u + guidance_scale * (c - u), c, guidance_rescale)
            x0, eps = self.schedule.to_x0_eps(self.prediction, out.to(x.dtype), x, t)
            if threshold is not None or clip_denoised:
                x0 = dynamic_threshold(x0, threshold) if threshold is not None else x0.clamp(-1, 1)
                alpha, sigma = self.schedule.alpha_sigma(t, x)
                eps = (x - alpha * x0) / sigma.clamp(min=1e-8)
            return x0, eps

        return denoise

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        eta: float = 0.0,
        dynamic_threshold: float | None = None,
        clip_denoised: bool | None = None,
        use_ema: bool = True,
        layout: list | str | None = None,
        **unknown,
    ) -> Tensor:
        """Sample images for ``prompts``: (b, 3, image_size, image_size) in [-1, 1].

        Defaults come from the constructor; ``seed`` (an int, or one per prompt) fixes the
        initial noise and every sampler's noise, so the same seed gives the same images. Options
        of subclasses (a super-resolution stage's ``low_res``) arrive in ``unknown`` and become
        extra denoiser inputs through :meth:`denoiser_inputs`; anything else is a TypeError.
        ``layout`` (a layout-conditioned denoiser): one ``[(phrase, (x0, y0, x1, y1)), ...]`` per
        prompt, boxes in [0, 1], or ``"plan"`` for ``recaption.plan_layout`` of each caption;
        guidance's unconditional branch has no layout.
        """
        cond = self.denoiser_inputs(len(prompts), seed, unknown)
        cond |= self.generation_layout(list(prompts), layout, use_ema)
        d = self.sampling_defaults
        sampler = sampler or d["sampler"]
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        steps = steps or d["steps"]
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        threshold = dynamic_threshold if dynamic_threshold is not None else d["dynamic_threshold"]
        generator = self.generator(seed, self.device)
        noise = randn((len(prompts), *self.sample_shape), generator, device=self.device)
        clip = d["clip_denoised"] if clip_denoised is None else clip_denoised
        if self.autoencoder is not None and (threshold is not None or clip):
            raise ValueError(
                "dynamic_threshold and clip_denoised clamp to the pixels' [-1, 1], which latents do not have: "
                "not for latent diffusion"
            )
        rescale = d["guidance_rescale"] if guidance_rescale is None else guidance_rescale
        denoise = self.denoise_fn(list(prompts), guidance_scale, threshold, use_ema, cond, clip, rescale)
        x = SAMPLERS[sampler](denoise, self.schedule, noise, steps=steps, eta=eta, generator=generator)
        if self.autoencoder is not None:
            x = self.from_latents(x)
        return x.clamp(-1, 1)


class SuperResolutionDiffusion(TextToImageDiffusion):
    """A cascade stage: diffusion at ``image_size`` conditioned on the text and on a
    ``low_res_size`` image, upsampled and concatenated to the input. The low-resolution image
    is noise-augmented during training (Imagen): a random level up to ``max_aug_level`` of
    the schedule, told to the network; sampling uses ``sample_aug_level``.

    Args:
        low_res_size: side of the conditioning image.
        max_aug_level: largest augmentation timestep, as a fraction of ``T``.
        sample_aug_level: augmentation timestep used when generating, as a fraction of ``T``.
        **kwargs: the TextToImageDiffusion arguments (the denoiser needs ``cond_channels=3``).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        text_encoder: nn.Module,
        low_res_size: int = 16,
        max_aug_level: float = 0.3,
        sample_aug_level: float = 0.1,
        **kwargs,
    ):
        if kwargs.get("autoencoder") is not None:
            raise ConfigError(
                "a super-resolution stage works in pixel space: remove model.init_args.autoencoder"
            )
        super().__init__(denoiser, text_encoder, **kwargs)
        self.low_res_size, self.max_aug_level, self.sample_aug_level = (
            low_res_size,
            max_aug_level,
            sample_aug_level,
        )

    def prepare_low_res(self, low_res: Tensor, level: Tensor, generator: Generators = None) -> dict:
        """Noise-augment (b, 3, low, low) at timestep ``level`` (b,) and upsample to ``image_size``."""
        noise = randn(low_res.shape, generator, device=low_res.device, dtype=low_res.dtype)
        noisy = torch.where(
            level.view(-1, 1, 1, 1) > 0, self.schedule.add_noise(low_res, noise, level), low_res
        )
        up = F.interpolate(noisy, size=self.image_size, mode="bilinear", align_corners=False)
        return {"cond_image": up, "aug_level": level}

    def conditioning(self, batch: dict) -> dict:
        low = F.interpolate(
            batch["image"], size=self.low_res_size, mode="bilinear", antialias=True, align_corners=False
        )
        high = int(self.max_aug_level * self.schedule.timesteps)
        level = torch.randint(0, max(high, 1), (low.shape[0],), device=low.device)
        return self.prepare_low_res(low, level)

    def sampling_options(self) -> tuple[str, ...]:
        return ("low_res", *super().sampling_options())

    def denoiser_inputs(self, batch_size: int, seed: int | list[int] | None, options: dict) -> dict:
        """``generate(prompts, low_res=...)``: the image to upsample, (b, 3, low_res_size,
        low_res_size) in [-1, 1], noise-augmented at ``sample_aug_level``."""
        options = dict(options)
        low_res = options.pop("low_res", None)
        self.check_sampling(options)
        if low_res is None:
            raise NotImplementedError(
                "super-resolution needs low_res images; use DiffusionCascade to generate from text alone"
            )
        level = torch.full(
            (batch_size,), int(self.sample_aug_level * self.schedule.timesteps), device=self.device
        )
        return self.prepare_low_res(
            low_res.to(self.device), level, self.generator(offset(seed, 1), self.device)
        )


class DiffusionCascade(TextToImageModule):
    """Base model then super-resolution stage(s), each loaded from its checkpoint; for
    ``predict`` and evaluation (train each stage with its own config).

    Args:
        base_checkpoint: checkpoint of a TextToImageDiffusion.
        sr_checkpoints: checkpoints of SuperResolutionDiffusion stages, in order.
        base_sampling: ``generate`` options of the base stage.
        sr_sampling: ``generate`` options of the super-resolution stages.
    """

    def __init__(
        self,
        base_checkpoint: str,
        sr_checkpoints: list[str],
        base_sampling: dict | None = None,
        sr_sampling: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.base = TextToImageDiffusion.load_from_checkpoint(
            base_checkpoint, map_location="cpu", weights_only=False
        )
        self.stages = nn.ModuleList(
            SuperResolutionDiffusion.load_from_checkpoint(p, map_location="cpu", weights_only=False)
            for p in sr_checkpoints
        )
        self.base_sampling, self.sr_sampling = base_sampling or {}, sr_sampling or {}
        self.base.check_sampling(self.base_sampling)
        for stage in self.stages:
            stage.check_sampling(self.sr_sampling)

    def sampling_options(self) -> tuple[str, ...]:
        return self.base.sampling_options()  # passed on to the base stage

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int | list[int] | None = None, **sampling) -> Tensor:
        """(b, 3, h, w) in [-1, 1] at the last stage's resolution; ``sampling`` overrides the base
        stage's options (those of :meth:`TextToImageDiffusion.generate`)."""
        self.check_sampling(sampling)
        x = self.base.generate(prompts, seed=seed, **{**self.base_sampling, **sampling})
        for stage in self.stages:
            x = stage.generate(prompts, low_res=x, seed=seed, **self.sr_sampling)
        return x
