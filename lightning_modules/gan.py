"""Text-conditional GANs: StackGAN stage I, StackGAN stage II (on a frozen stage I) and the
StackGAN++ tree, trained with manual optimization of a generator and a discriminator.

Step counting. Lightning counts every optimizer step in ``trainer.global_step``. One training
batch makes one discriminator step, and every ``d_steps_per_g_step``-th batch also one generator
step, so with the default ``d_steps_per_g_step=1`` one batch is two steps: ``max_steps``,
``ModelCheckpoint(every_n_train_steps)`` and ``SampleGrid(every_n_steps)`` see that count.
Logged metrics are different: Lightning steps its loggers once per batch whatever the number of
optimizers, so the W&B x-axis (``trainer/global_step``) and ``log_every_n_steps`` count batches.
``train/g_steps`` and ``train/d_steps`` log each network's own count; the EMA warm-up follows
the generator's.
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.errors import ConfigError
from networks.frozen import keep_out_of_checkpoints
from networks.noise import Generators, randn
from networks.stackgan import ConditioningAugmentation, GeneratorOutput, colour_consistency
from networks.text_encoders import TextEncoding

from .base import TextToImageModule
from .clip import load_clip
from .ema import ema_decay, ema_update
from .manual import ManualOptimization

AdversarialLoss = Literal["bce", "hinge"]


def _adam(params):
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999), fused=True)


def discriminator_loss(real: Tensor, mismatched: Tensor, fake: Tensor, kind: AdversarialLoss) -> Tensor:
    """Matching-aware conditional loss: real image with its caption is real; the real image with
    another caption and the generated image with its caption are fake (weighted 1/2 each)."""
    if kind == "hinge":  # DF-GAN
        return F.relu(1 - real).mean() + 0.5 * (F.relu(1 + mismatched).mean() + F.relu(1 + fake).mean())
    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
    bce = F.binary_cross_entropy_with_logits
    return bce(real, ones) + 0.5 * (bce(mismatched, zeros) + bce(fake, zeros))


def unconditional_discriminator_loss(real: Tensor, fake: Tensor, kind: AdversarialLoss) -> Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    bce = F.binary_cross_entropy_with_logits
    return bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))


def generator_loss(fake: Tensor, kind: AdversarialLoss) -> Tensor:
    if kind == "hinge":
        return -fake.mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # the non-saturating loss


def mode_seeking_loss(a: Tensor, b: Tensor, z_a: Tensor, z_b: Tensor, eps: float = 1e-5) -> Tensor:
    """MSGAN's mode-seeking term (Mao et al., 2019): ``1 / (mean|a - b| / mean|z_a - z_b| + eps)``
    for images ``a`` and ``b`` drawn for the same captions from latents ``z_a`` and ``z_b``. It is
    large when the image ignores the latent (mode collapse) and falls as images spread apart."""
    return 1 / ((a - b).abs().mean() / (z_a - z_b).abs().mean() + eps)


def matching_aware_gradient_penalty(
    discriminator: nn.Module, real: Tensor, sentence: Tensor, power: float = 6.0
) -> Tensor:
    """DF-GAN's MA-GP: ``mean(||grad_(image, sentence) D(image, sentence)||^p)`` on real, matching
    pairs, which smooths the discriminator around the real data and its text."""
    image = real.detach().requires_grad_(True)
    sentence = sentence.detach().requires_grad_(True)
    out, _ = discriminator(image, sentence)
    grads = torch.autograd.grad(out.sum(), (image, sentence), create_graph=True)
    norm = torch.cat([g.flatten(1) for g in grads], dim=1).pow(2).sum(1).sqrt()
    return norm.pow(power).mean()


def r1_gradient_penalty(discriminator: nn.Module, real: Tensor, sentence: Tensor) -> Tensor:
    """R1 (Mescheder et al., 2018) of a conditional discriminator: ``mean(||grad_image D(image,
    sentence)||^2)`` on real, matching pairs (the gradient with respect to the pixels alone, as
    StyleGAN2 and StyleGAN-T take it; the caller weighs it by ``gamma / 2``)."""
    image = real.detach().requires_grad_(True)
    out, _ = discriminator(image, sentence.detach())
    (grad,) = torch.autograd.grad(out.sum(), image, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class TextToImageGAN(ManualOptimization, TextToImageModule):
    """A text-conditional GAN with a matching-aware discriminator per output scale.

    With ``networks.stackgan.StageIGenerator`` and one discriminator this is StackGAN stage I;
    with ``networks.stackgan.TreeGenerator`` and one discriminator per scale it is StackGAN++
    (conditional and unconditional losses at every scale, optional colour consistency).

    The text encoder's pooled sentence vector conditions both networks. A trainable text
    encoder is updated by the discriminator's optimizer (the matching-aware loss is what
    teaches it to tell captions apart); the generator sees its output detached. A frozen
    pretrained encoder is used as is.

    Args:
        generator: ``(z, sentence, generator=rng) -> GeneratorOutput`` with a ``z_dim`` attribute.
        discriminators: one ``(image, sentence) -> (cond_logits, uncond_logits)`` per output scale, lowest
            first, with ``features(image)`` and ``heads(features, sentence)`` (``networks.stackgan.MatchingAwareDiscriminator``).
        text_encoder: the injected text encoder (trainable or frozen).
        loss: ``bce`` (StackGAN) or ``hinge`` (DF-GAN).
        kl_weight: weight of the conditioning-augmentation KL term in the generator loss.
        uncond_weight: weight of the unconditional (realism-only) terms; 0 disables them (StackGAN stage I).
        colour_weight: StackGAN++ colour-consistency weight between consecutive scales (0 disables).
        ma_gp_weight: DF-GAN matching-aware gradient penalty weight (0 disables; DF-GAN uses 2).
        ma_gp_power: its exponent (DF-GAN: 6).
        d_steps_per_g_step: discriminator steps (batches) per generator step.
        g_optimizer, d_optimizer: optimizer factories of the generator and the discriminator(s)
            (plus a trainable text encoder).
        g_lr_scheduler, d_lr_scheduler: optional scheduler factories, stepped after each step of their optimizer.
        g_clip_norm, d_clip_norm: gradient-norm clipping per network (None: no clipping).
        ema_decay: decay of the EMA of the generator (updated at each generator step) and of a
            trainable text encoder (at each discriminator step); ``generate`` and the sample
            grids use the two EMAs together.
        mode_seeking_weight: weight of MSGAN's mode-seeking term (``mode_seeking_loss``) between
            two images of half the batch's captions from two latents (0 disables; MSGAN: 1). It
            costs half a generator pass more per generator step.
        ortho_weight: BigGAN's orthogonal regularisation of the generator's weight matrices
            (``networks.stylegan.orthogonal_penalty`` over the generator's ``ortho_weights()``,
            or all its parameters; BigGAN: 1e-4; 0 disables).
        r1_weight: gamma of the R1 penalty (``r1_gradient_penalty``), ``gamma / 2 * |grad|^2``, on
            every scale's discriminator (StyleGAN2 at 32 px: 0.01 to 1; 0 disables).
        r1_interval: StyleGAN2's lazy regularisation: the penalty on every ``r1_interval``-th
            discriminator step only, weighted by ``r1_interval``. Which steps is a function of the
            step count alone, so under DDP every rank regularises at the same steps.
        accumulate: batches per optimizer step of each network (manual gradient accumulation,
            ``lightning_modules.manual``; Lightning's ``accumulate_grad_batches`` does not apply).
        clip: checkpoint of a frozen CLIP for StyleGAN-T's CLIP loss on the generator (never the
            table's judge) and ``clip_weight``, its weight (both or neither). The loss is the
            spherical distance of the VQGAN+CLIP notebooks, half the squared angle between the
            CLIP embedding of the generated image (resized by ``encode_image`` to the CLIP's input)
            and that of its caption (StyleGAN-T: the squared angle).

    A generator with ``uses_tokens`` (``networks.stylegan.StyleGenerator`` with text
    cross-attention) also gets the caption's tokens and mask (detached, as the pooled vector is);
    one that takes ``truncation`` gets ``generate(..., truncation=psi)``.
    """

    _derived_arguments: tuple[str, ...] = ()  # constructor arguments a subclass computes (not saved)
    steps_key = "gan_steps"

    def __init__(
        self,
        generator: nn.Module,
        discriminators: list[nn.Module],
        text_encoder: nn.Module,
        loss: AdversarialLoss = "bce",
        kl_weight: float = 1.0,
        uncond_weight: float = 0.0,
        colour_weight: float = 0.0,
        ma_gp_weight: float = 0.0,
        ma_gp_power: float = 6.0,
        d_steps_per_g_step: int = 1,
        g_optimizer: OptimizerCallable = _adam,
        d_optimizer: OptimizerCallable = _adam,
        g_lr_scheduler: LRSchedulerCallable | None = None,
        d_lr_scheduler: LRSchedulerCallable | None = None,
        g_clip_norm: float | None = None,
        d_clip_norm: float | None = None,
        ema_decay: float = 0.999,
        ortho_weight: float = 0.0,
        mode_seeking_weight: float = 0.0,
        r1_weight: float = 0.0,
        r1_interval: int = 1,
        accumulate: int = 1,
        clip: str | None = None,
        clip_weight: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=list(self._derived_arguments))
        self.init_optimizers(
            {"g": (g_optimizer, g_lr_scheduler), "d": (d_optimizer, d_lr_scheduler)},
            {"g": g_clip_norm, "d": d_clip_norm},
            accumulate,
        )
        if d_steps_per_g_step < 1:
            raise ValueError(f"d_steps_per_g_step must be at least 1, got {d_steps_per_g_step}")
        if r1_interval < 1:
            raise ValueError(f"r1_interval must be at least 1, got {r1_interval}")
        if bool(clip_weight) != (clip is not None):
            raise ConfigError("model.init_args.clip and clip_weight go together: a CLIP checkpoint (not the judge's) "
                              f"with a weight above 0, or neither (got clip {clip!r}, clip_weight {clip_weight})")
        if r1_weight and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for d in discriminators for m in d.modules()):
            raise ConfigError("r1_weight > 0 with a batch-norm discriminator: R1 penalises each image's own input gradient, "
                              "which batch norm couples across the batch; use norm: none in the discriminators")
        self.r1_weight, self.r1_interval, self.clip_weight = r1_weight, r1_interval, clip_weight
        self.clip = keep_out_of_checkpoints(load_clip(clip, option="model.init_args.clip")) if clip_weight else None
        self.generator_net, self.text_encoder = generator, text_encoder
        self.discriminators = nn.ModuleList(discriminators)
        self.ema_generator = copy.deepcopy(generator).requires_grad_(False).eval()
        trainable_text = any(p.requires_grad for p in text_encoder.parameters())
        self.ema_text_encoder = (
            copy.deepcopy(text_encoder).requires_grad_(False).eval() if trainable_text else None
        )
        self.loss_kind, self.kl_weight, self.uncond_weight = loss, kl_weight, uncond_weight
        self.colour_weight, self.ma_gp_weight, self.ma_gp_power = colour_weight, ma_gp_weight, ma_gp_power
        self.d_steps_per_g_step, self.ema_decay, self.ortho_weight = d_steps_per_g_step, ema_decay, ortho_weight
        self.mode_seeking_weight = mode_seeking_weight
        self._check_dims()

    def _check_dims(self) -> None:
        text_dim = getattr(self.text_encoder, "dim", None)
        ca = next((m for m in self.generator_net.modules() if isinstance(m, ConditioningAugmentation)), None)
        if text_dim is not None and ca is not None and ca.fc.in_features != text_dim:
            raise ValueError(
                f"the generator expects {ca.fc.in_features}-d sentence vectors but the text encoder gives {text_dim}; "
                f"set the generator's and discriminators' text_dim to {text_dim}"
            )

    @property
    def image_size(self) -> int:
        return self.generator_net.image_size

    # ------------------------------------------------------------------ networks
    def encode(self, captions: list[str], ema: bool = False) -> TextEncoding:
        """The captions' encoding (tokens, mask, pooled); with ``ema``, from the EMA of a trainable
        text encoder, which goes with the EMA generator."""
        encoder = self.ema_text_encoder if ema and self.ema_text_encoder is not None else self.text_encoder
        return encoder(list(captions))

    def sentence(self, captions: list[str], ema: bool = False) -> Tensor:
        """Pooled sentence vectors (b, d)."""
        return self.encode(captions, ema).pooled

    def run_generator(
        self, sentence: Tensor, *, ema: bool = False, generator: Generators = None,
        context: TextEncoding | None = None, z: Tensor | None = None, **options,
    ) -> GeneratorOutput:  # fmt: skip
        """The generator's output for ``sentence`` (from latents ``z``, drawn when None); a generator
        that ``uses_tokens`` also gets ``context``'s tokens and mask (detached); ``options`` (e.g.
        ``truncation``) go to it."""
        net = self.ema_generator if ema else self.generator_net
        if z is None:
            z = randn((sentence.shape[0], net.z_dim), generator, device=sentence.device)
        if getattr(net, "uses_tokens", False):
            if context is None:
                raise ValueError("this generator attends to the caption's tokens: pass the encoding as context=")
            options.update(tokens=context.tokens.detach(), mask=context.mask)
        return net(z, sentence, generator=generator, **options)

    def real_scales(self, image: Tensor, fakes: list[Tensor]) -> list[Tensor]:
        """The real batch at the side of each generated scale."""
        if image.shape[-1] != fakes[-1].shape[-1]:
            raise ValueError(
                f"batch images are {image.shape[-1]} px but the generator makes {fakes[-1].shape[-1]} px; "
                "set the data image_size to the generator's output size"
            )
        return [image if f.shape[-1] == image.shape[-1] else F.interpolate(image, size=f.shape[-2:], mode="area")
                for f in fakes]  # fmt: skip

    # ------------------------------------------------------------------ losses
    def d_loss(self, reals: list[Tensor], fakes: list[Tensor], sentence: Tensor, regularise: bool = False) -> tuple[Tensor, dict]:
        """Matching-aware (plus unconditional, MA-GP and, with ``regularise``, R1) discriminator
        loss summed over scales."""
        mismatched = sentence.roll(1, dims=0)
        total, logs = 0.0, {}
        for i, (d, real, fake) in enumerate(zip(self.discriminators, reals, fakes)):
            # separate passes, as the generator step sees generated images alone: with batch norm
            # a mixed real|fake batch would be normalised differently from the one G is scored on
            h_real = d.features(real)  # encoded once for the matching and the mismatched caption
            c_real, u_real = d.heads(h_real, sentence)
            c_mis, _ = d.heads(h_real, mismatched)
            c_fake, u_fake = d(fake.detach(), sentence)
            loss = discriminator_loss(c_real, c_mis, c_fake, self.loss_kind)
            if self.uncond_weight:
                loss = loss + self.uncond_weight * unconditional_discriminator_loss(
                    u_real, u_fake, self.loss_kind
                )
            if self.ma_gp_weight:
                gp = matching_aware_gradient_penalty(d, real, sentence, self.ma_gp_power)
                loss = loss + self.ma_gp_weight * gp
                logs[f"ma_gp_{i}"] = gp.detach()
            if regularise:
                r1 = r1_gradient_penalty(d, real, sentence)
                loss = loss + self.r1_weight / 2 * self.r1_interval * r1
                logs[f"r1_{i}"] = r1.detach()
            total = total + loss
            logs[f"d_real_{i}"] = c_real.detach().mean()
            logs[f"d_fake_{i}"] = c_fake.detach().mean()
        return total, logs

    def regularise_at(self, d_step: int) -> bool:
        """Whether the passes of discriminator step ``d_step`` (from 1) take the R1 penalty: the
        first of every ``r1_interval`` (a function of the step count, so the same on every rank)."""
        return bool(self.r1_weight) and (d_step - 1) % self.r1_interval == 0

    def clip_loss(self, image: Tensor, captions: list[str]) -> Tensor:
        """StyleGAN-T's CLIP guidance: the mean spherical distance (half the squared angle) between
        the frozen CLIP's embeddings of the images and of their captions."""
        from .clip_guided import spherical_distance

        with torch.no_grad():
            text = self.clip.encode_text(list(captions))
        return spherical_distance(self.clip.encode_image(image), text).mean()

    def g_loss(self, out: GeneratorOutput, sentence: Tensor, captions: list[str] | None = None,
               encoding: TextEncoding | None = None) -> tuple[Tensor, dict]:  # fmt: skip
        """The generator's loss over its scales (plus KL, orthogonal, colour and CLIP terms);
        ``captions`` for the CLIP loss, ``encoding`` (the captions' encoding, if made) for
        subclasses that read the words."""
        total, logs = 0.0, {}
        if self.clip_weight:
            if captions is None:
                raise ValueError("the CLIP loss needs the captions: g_loss(out, sentence, captions)")
            clip = self.clip_loss(out.images[-1], captions)
            logs["clip"] = clip.detach()
            total = total + self.clip_weight * clip
        for d, fake in zip(self.discriminators, out.images):
            cond, uncond = d(fake, sentence)
            total = total + generator_loss(cond, self.loss_kind)
            if self.uncond_weight:
                total = total + self.uncond_weight * generator_loss(uncond, self.loss_kind)
        if out.mu is not None:  # conditioning augmentation's KL term
            kl = ConditioningAugmentation.kl(out.mu, out.logvar)
            logs["kl"] = kl.detach()
            total = total + self.kl_weight * kl
        if self.ortho_weight:
            from networks.stylegan import orthogonal_penalty

            net = self.generator_net  # its own choice of matrices (e.g. effective weights), else all of them
            ortho = orthogonal_penalty(getattr(net, "ortho_weights", net.parameters)(), self.ortho_weight)
            logs["ortho"] = ortho.detach()
            total = total + ortho
        if self.colour_weight and len(out.images) > 1:
            colour = sum(colour_consistency(lo, hi) for lo, hi in zip(out.images, out.images[1:]))
            logs["colour"] = colour.detach()
            total = total + self.colour_weight * colour
        return total, logs

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        g_opt, d_opt = self.optimizer("g"), self.optimizer("d")
        captions, image = batch["caption"], batch["image"]
        b = len(captions)
        d_step = self.steps["d"] + 1  # the discriminator step this batch's pass goes to (from 1)
        with self.toggled_optimizer(d_opt):
            encoding = self.encode(captions)  # trains a trainable text encoder through the D loss
            sentence = encoding.pooled
            with torch.no_grad():
                fakes = self.run_generator(sentence.detach(), context=encoding).images
            d_loss, logs = self.d_loss(self.real_scales(image, fakes), fakes, sentence, self.regularise_at(d_step))
            d_stepped = self.step_optimizer("d", d_loss)
        if d_stepped and self.ema_text_encoder is not None:  # the encoder trains with the discriminator
            ema_update(self.ema_text_encoder, self.text_encoder, ema_decay(self.ema_decay, self.steps["d"]))
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, batch_size=b)
        # the generator's passes go with the discriminator steps after which it steps (every
        # d_steps_per_g_step-th), so that with accumulation both step on the same batch
        if d_step % self.d_steps_per_g_step == 0:
            with self.toggled_optimizer(g_opt):
                # the D step's encoding, detached: the generator does not train the encoder
                sentence = sentence.detach()
                z = randn((b, self.generator_net.z_dim), None, device=sentence.device) if self.mode_seeking_weight else None
                out = self.run_generator(sentence, context=encoding, z=z)
                g_loss, g_logs = self.g_loss(out, sentence, captions, encoding)
                if z is not None:  # a second image for half the captions, from another z
                    h = max(1, b // 2)
                    z2 = randn((h, z.shape[1]), None, device=z.device)
                    half = TextEncoding(*(x[:h] for x in encoding))
                    other = self.run_generator(sentence[:h], context=half, z=z2).images[-1]
                    seeking = mode_seeking_loss(out.images[-1][:h], other, z[:h], z2)
                    g_logs["mode_seeking"] = seeking.detach()
                    g_loss = g_loss + self.mode_seeking_weight * seeking
                g_stepped = self.step_optimizer("g", g_loss)
            if g_stepped:
                ema_update(self.ema_generator, self.generator_net, ema_decay(self.ema_decay, self.steps["g"]))
            self.log("train/g_loss", g_loss.detach(), prog_bar=True, batch_size=b)
            logs.update(g_logs)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=b)
        self.log_dict(
            {"train/g_steps": float(self.steps["g"]), "train/d_steps": float(self.steps["d"])}, batch_size=b
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Discriminator's view of held-out data: how often it accepts real matching pairs and
        rejects mismatched captions and EMA samples (the generator's quality is measured by
        callbacks such as ``ShapesScore`` through ``generate``)."""
        captions, image = batch["caption"], batch["image"]
        encoding = self.encode(captions)
        sentence = encoding.pooled
        ema_encoding = encoding if self.ema_text_encoder is None else self.encode(captions, ema=True)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            fakes = self.run_generator(ema_encoding.pooled, ema=True, context=ema_encoding).images
        reals = self.real_scales(image, fakes)
        d = self.discriminators[-1]
        h_real = d.features(reals[-1])
        real, _ = d.heads(h_real, sentence)
        mis, _ = d.heads(h_real, sentence.roll(1, dims=0))
        fake, _ = d(fakes[-1], sentence)
        accuracy = torch.cat([real > 0, mis < 0, fake < 0]).float().mean()
        self.log("val/d_accuracy", accuracy, sync_dist=True, batch_size=len(captions))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()  # frozen
        return self

    def optimizer_parameters(self) -> dict:
        return {
            "g": list(self.generator_net.parameters()),
            "d": list(self.discriminators.parameters())
            + [p for p in self.text_encoder.parameters() if p.requires_grad],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if self.ema_text_encoder is not None and not any(k.startswith("ema_text_encoder.") for k in state):
            # a checkpoint from before the text encoder had an EMA: start it from the live weights
            state.update({"ema_" + k: v for k, v in list(state.items()) if k.startswith("text_encoder.")})

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        use_ema: bool = True,
        all_scales: bool = False,
        truncation: float = 1.0,
        **unknown,
    ) -> Tensor | list[Tensor]:
        """Images for ``prompts``: (b, 3, s, s) in [-1, 1] at the highest scale (every scale,
        lowest first, with ``all_scales``). ``seed`` (an int, or one per prompt) fixes the noise
        and the conditioning code. ``use_ema``: the EMA generator and text encoder (default).
        ``truncation``: the truncation trick's psi in [0, 1] (1: none), for a generator that has it."""
        self.check_sampling(unknown)
        options = {}
        if truncation != 1.0:
            if "truncation" not in inspect.signature(self.generator_net.forward).parameters:
                raise ValueError(f"truncation {truncation}: {type(self.generator_net).__name__} has no truncation trick; "
                                 "leave it at 1.0 or use networks.stylegan.StyleGenerator")  # fmt: skip
            options["truncation"] = truncation
        encoding = self.encode(prompts, ema=use_ema)
        out = self.run_generator(
            encoding.pooled, ema=use_ema, generator=self.generator(seed, self.device), context=encoding, **options
        )
        return [x.clamp(-1, 1) for x in out.images] if all_scales else out.images[-1].clamp(-1, 1)


class StackGANStageII(TextToImageGAN):
    """StackGAN stage II: refines the images of a frozen stage I (loaded from ``stage1_checkpoint``)
    from the text, against its own matching-aware discriminator. The stage-I generator (its EMA)
    and text encoder are frozen; ``generate`` runs both stages.

    Args:
        stage1_checkpoint: a ``TextToImageGAN`` checkpoint (stage I). It must exist when this
            module is built, including when a stage-II checkpoint is loaded (its stage-I weights
            are then replaced by the ones saved with stage II).
        generator: ``networks.stackgan.StageIIGenerator`` (``(low_res, sentence, generator=rng)``).
        discriminators: one discriminator at the stage-II resolution.
        **kwargs: the :class:`TextToImageGAN` options (loss, weights, optimizers, EMA, ...).
    """

    _derived_arguments = ("text_encoder",)  # stage I's

    def __init__(
        self, stage1_checkpoint: str, generator: nn.Module, discriminators: list[nn.Module], **kwargs
    ):
        if not os.path.exists(stage1_checkpoint):
            raise FileNotFoundError(
                f"stage-I checkpoint {stage1_checkpoint!r} not found: train stage I first "
                "(configs/gan/stackgan1_shapes.yaml) and set model.init_args.stage1_checkpoint to its last.ckpt"
            )
        stage1 = TextToImageGAN.load_from_checkpoint(
            stage1_checkpoint, map_location="cpu", weights_only=False
        )
        stage1.requires_grad_(False).eval()
        if generator.low_res_size != stage1.image_size:
            raise ValueError(
                f"stage I makes {stage1.image_size} px images but the stage-II generator expects "
                f"{generator.low_res_size} px; set its low_res_size to {stage1.image_size}"
            )
        # stage I samples with its EMA generator and the text encoder that goes with it
        text_encoder = stage1.ema_text_encoder if stage1.ema_text_encoder is not None else stage1.text_encoder
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # the CLI's records (_class_path)
        super().__init__(generator, discriminators, text_encoder, **kwargs)  # frozen with stage I
        self.stage1_generator = stage1.ema_generator

    def train(self, mode: bool = True):
        super().train(mode)
        self.stage1_generator.eval()  # frozen: its batch norm keeps its running statistics
        self.text_encoder.eval()
        return self

    def _stages(self, sentence: Tensor, ema: bool, generator: Generators) -> tuple[Tensor, GeneratorOutput]:
        """The frozen stage-I image and the stage-II output for it."""
        z = randn((sentence.shape[0], self.stage1_generator.z_dim), generator, device=sentence.device)
        with torch.no_grad():
            low_res = self.stage1_generator(z, sentence, generator=generator).images[-1]
        net = self.ema_generator if ema else self.generator_net
        return low_res, net(low_res, sentence, generator=generator)

    def run_generator(self, sentence: Tensor, *, ema: bool = False, generator: Generators = None, **unused):
        return self._stages(sentence, ema, generator)[1]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        use_ema: bool = True,
        all_scales: bool = False,
        **unknown,
    ):
        """Stage I then stage II; ``all_scales`` returns ``[stage-I image, stage-II image]``."""
        self.check_sampling(unknown)
        low_res, out = self._stages(self.sentence(prompts), use_ema, self.generator(seed, self.device))
        high = out.images[-1]
        return [low_res.clamp(-1, 1), high.clamp(-1, 1)] if all_scales else high.clamp(-1, 1)


class AttnGAN(TextToImageGAN):
    """AttnGAN (Xu et al., 2018): ``networks.attngan.AttnGenerator``, whose later stages attend to
    the words, trained against one matching-aware discriminator per scale (conditional and
    unconditional terms, as StackGAN++) plus the DAMSM loss of its last image under a pretrained,
    frozen DAMSM (``lightning_modules.damsm``), whose text encoder is also the GAN's (words and
    sentence vector; frozen, as in the paper).

    Args:
        damsm: a DAMSM checkpoint (``configs/gan/damsm_shapes32.yaml``). It must exist when this
            module is built, also when one of its checkpoints is loaded (its DAMSM weights are
            then the ones saved with it).
        generator: ``networks.attngan.AttnGenerator`` with ``text_dim`` the DAMSM's ``dim``.
        discriminators: one per generated scale, lowest first, with ``text_dim`` the DAMSM's ``dim``.
        damsm_weight: lambda, the DAMSM loss's weight in the generator's loss (AttnGAN: 5 on birds,
            50 on COCO; 0 disables). The smoothing factors and the masking of shared captions are
            the DAMSM's own.
        **kwargs: the :class:`TextToImageGAN` options.
    """

    _derived_arguments = ("text_encoder",)  # the DAMSM's

    def __init__(self, damsm: str, generator: nn.Module, discriminators: list[nn.Module], damsm_weight: float = 5.0,
                 **kwargs):  # fmt: skip
        from .damsm import load_damsm

        model = load_damsm(damsm, option="model.init_args.damsm")  # its text encoder's dim is checked as any
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # the CLI's records (_class_path)
        super().__init__(generator, discriminators, model.text_encoder, **kwargs)
        self.damsm_image_encoder = model.image_encoder
        self.damsm_weight, self.gammas, self.mask_same = damsm_weight, model.gammas, model.mask_same_captions

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()  # frozen: DAMSM's
        self.damsm_image_encoder.eval()
        return self

    def g_loss(self, out: GeneratorOutput, sentence: Tensor, captions: list[str] | None = None,
               encoding: TextEncoding | None = None) -> tuple[Tensor, dict]:  # fmt: skip
        total, logs = super().g_loss(out, sentence, captions, encoding)
        if self.damsm_weight:
            from networks.attngan import damsm_loss, same_captions

            if captions is None:
                raise ValueError("the DAMSM loss needs the captions: g_loss(out, sentence, captions)")
            text = encoding  # the discriminator step's, from the same frozen encoder
            if text is None:
                with torch.no_grad():
                    text = self.text_encoder(list(captions))
            regions, global_image = self.damsm_image_encoder(out.images[-1])
            same = same_captions(captions).to(sentence.device) if self.mask_same else None
            word, sent = damsm_loss(text.tokens, text.mask, text.pooled, regions.flatten(2).transpose(1, 2),
                                    global_image, *self.gammas, same=same)  # fmt: skip
            logs.update(damsm_word=word.detach(), damsm_sentence=sent.detach())
            total = total + self.damsm_weight * (word + sent)
        return total, logs
