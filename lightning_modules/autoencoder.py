"""Image autoencoders: VQ-VAE, VQGAN and the KL autoencoder of latent diffusion.

They are not text-to-image methods but the first stage of those that build on them (token
priors, latent diffusion, CLIP guidance), which load one frozen with :func:`load_autoencoder`
and use only its contract (ARCHITECTURE.md, "Autoencoders and priors"):

- ``encode(images) -> latents`` (KL) or ``(latents, indices)`` (VQ), images ``(b, 3, h, w)`` in
  [-1, 1], latents ``(b, latent_channels, h / f, w / f)``, indices ``(b, h / f, w / f)``;
- ``decode(latents)`` and, for VQ, ``decode_indices(indices)``, back to images in [-1, 1];
- ``downsample_factor``, ``latent_channels``, ``latent_shape`` and, for VQ, ``codebook_size``.

Training (manual optimization): the autoencoder's loss is a pixel reconstruction loss (L1 or
L2), plus an optional LPIPS perceptual loss, plus the bottleneck's term (VQ: codebook and
commitment; KL: ``kl_weight`` times the KL divergence), plus, from ``disc_start`` autoencoder
steps on, a PatchGAN's hinge loss weighted adaptively (taming-transformers). Each batch makes one
autoencoder step and, once the discriminator is on, one discriminator step: ``global_step``
counts both; ``disc_start`` counts autoencoder steps.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.errors import ConfigError, MissingFileError
from networks.frozen import keep_out_of_checkpoints
from networks.patchgan import hinge_d_loss, r1_penalty
from networks.perceptual import PerceptualLoss
from networks.quantizer import VectorQuantizer, perplexity, usage

from .base import BaseModule
from .manual import ManualOptimization


def _adam(params):
    return torch.optim.Adam(params, lr=4.5e-6 * 64, betas=(0.5, 0.9))  # taming: base lr x batch size


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming-transformers' balance of the adversarial loss: the ratio of the gradient norms of
    the reconstruction and adversarial losses at the decoder's last layer, clamped to
    ``[0, max_weight]`` and detached (a non-finite ratio gives 0)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.nan_to_num(weight.clamp(0.0, max_weight), nan=0.0, posinf=max_weight).detach()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image (dB) of images in [-1, 1], on the [0, 1] scale."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class Autoencoder(ManualOptimization, BaseModule):
    """What VQ and KL autoencoders share: networks, losses, the discriminator, training.

    Args:
        encoder: ``networks.autoencoder.Encoder`` (its output channels are the bottleneck's input).
        decoder: ``networks.autoencoder.Decoder``.
        image_size: side of the training images; a multiple of the downsampling factor.
        rec_loss: pixel reconstruction loss, ``l1`` or ``l2``.
        perceptual_weight: weight of the LPIPS loss; 0 trains without one (and needs no weights).
        perceptual_path: the local torchvision weights of the LPIPS trunk (file or folder).
        perceptual_net: the LPIPS trunk, ``vgg`` or ``alex``.
        discriminator: a ``networks.patchgan.PatchDiscriminator`` (VQGAN) or None (VQ-VAE).
        disc_start: autoencoder steps before the discriminator is switched on.
        disc_weight: weight of the adversarial loss (times the adaptive weight).
        d_r1_weight: gamma of an R1 gradient penalty on real images, ``gamma / 2 * |grad D(x)|^2``,
            added to the discriminator's loss (0: none, as in taming). It assumes no coupling between
            the images of a batch: give the discriminator ``norm: group`` (a batch norm warns).
        adaptive_disc_weight: scale the adversarial loss by the ratio of the reconstruction and
            adversarial gradient norms at the decoder's last layer (taming); False: by 1.
        optimizer, d_optimizer: optimizer factories of the autoencoder and the discriminator.
        lr_scheduler, d_lr_scheduler: optional scheduler factories, stepped with their optimizer.
        clip_norm, d_clip_norm: gradient-norm clipping of each network (None: none).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        image_size: int = 32,
        rec_loss: str = "l1",
        perceptual_weight: float = 0.0,
        perceptual_path: str | None = None,
        perceptual_net: str = "vgg",
        discriminator: nn.Module | None = None,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        adaptive_disc_weight: bool = True,
        d_r1_weight: float = 0.0,
        optimizer: OptimizerCallable = _adam,
        d_optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        d_lr_scheduler: LRSchedulerCallable | None = None,
        clip_norm: float | None = None,
        d_clip_norm: float | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.discriminator = encoder, decoder, discriminator
        self.image_size = image_size
        self.downsample_factor = encoder.downsample_factor
        if decoder.upsample_factor != self.downsample_factor:
            raise ConfigError(
                f"the encoder downsamples by {self.downsample_factor} but the decoder upsamples by "
                f"{decoder.upsample_factor}; give both the same channel_mult"
            )
        if image_size % self.downsample_factor:
            raise ConfigError(
                f"image_size {image_size} is not a multiple of the downsampling factor {self.downsample_factor}; "
                f"set model.init_args.image_size (and the data's image_size) to a multiple of {self.downsample_factor}, "
                f"e.g. {math.ceil(image_size / self.downsample_factor) * self.downsample_factor}, or use fewer levels in channel_mult"
            )
        if rec_loss not in ("l1", "l2"):
            raise ConfigError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.rec_kind = rec_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual = None
        if perceptual_weight > 0:
            if not perceptual_path:
                raise ConfigError(
                    "perceptual_weight > 0 needs the LPIPS trunk's weights: set model.init_args.perceptual_path "
                    "to a local torchvision VGG16 file or folder, or set perceptual_weight: 0 to train without it"
                )
            self.perceptual = keep_out_of_checkpoints(
                PerceptualLoss(perceptual_path, perceptual_net, option="model.init_args.perceptual_path")
            )
        self.disc_start, self.disc_weight, self.adaptive = disc_start, disc_weight, adaptive_disc_weight
        self.d_r1_weight = d_r1_weight
        if d_r1_weight > 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in (discriminator or nn.Identity()).modules()):
            warnings.warn(
                "d_r1_weight > 0 with a batch-norm discriminator: R1 penalises each image's own input gradient, "
                "which batch statistics couple to the other images of the batch; give the discriminator "
                "norm: group (or none)", stacklevel=2,
            )  # fmt: skip
        factories = {"ae": (optimizer, lr_scheduler)}
        if discriminator is not None:
            factories["d"] = (d_optimizer, d_lr_scheduler)
        self.init_optimizers(factories, {"ae": clip_norm, "d": d_clip_norm})

    # ------------------------------------------------------------------ contract
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.downsample_factor
        return (self.latent_channels, side, side)

    def bottleneck(self, h: Tensor) -> tuple[Tensor, Tensor, dict]:
        """Encoder output -> (decoder input, regularisation loss, logs). Subclasses define it."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Images -> their reconstructions, in [-1, 1] (eval-mode statistics are not updated)."""
        latents, _, _ = self.bottleneck(self.encoder(images))
        return self.decode(latents)

    # ------------------------------------------------------------------ losses
    def pixel_loss(self, x: Tensor, x_rec: Tensor) -> Tensor:
        diff = x_rec.float() - x.float()
        return diff.abs().mean() if self.rec_kind == "l1" else diff.pow(2).mean()

    def rec_loss(self, x: Tensor, x_rec: Tensor) -> tuple[Tensor, dict]:
        pixel = self.pixel_loss(x, x_rec)
        if self.perceptual is None:
            return pixel, {}
        p = self.perceptual(x, x_rec).mean()
        return pixel + self.perceptual_weight * p, {"perceptual": p.detach(), "pixel": pixel.detach()}

    def disc_on(self) -> bool:
        return self.discriminator is not None and self.steps["ae"] >= self.disc_start

    def optimizer_parameters(self) -> dict:
        params = {"ae": [p for n, p in self.named_parameters() if n.startswith(self._ae_prefixes)]}
        if self.discriminator is not None:
            params["d"] = list(self.discriminator.parameters())
        return params

    _ae_prefixes: tuple[str, ...] = ("encoder.", "decoder.", "quantizer.")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        b = x.shape[0]
        disc_on = self.disc_on()
        ae_opt = self.optimizer("ae")
        with self.toggled_optimizer(ae_opt):
            latents, reg_loss, logs = self.bottleneck(self.encoder(x))
            x_rec = self.decoder(latents)
            rec, rec_logs = self.rec_loss(x, x_rec)
            loss = rec + reg_loss
            if disc_on:
                g_loss = -self.discriminator(x_rec).float().mean()
                weight = (
                    adaptive_weight(rec, g_loss, self.decoder.last_layer)
                    if self.adaptive
                    else torch.ones((), device=x.device)
                )
                loss = loss + self.disc_weight * weight * g_loss
                logs.update(g_loss=g_loss.detach(), disc_weight=weight)
            self.step_optimizer("ae", loss)
        if disc_on:
            with self.toggled_optimizer(self.optimizer("d")):
                if self.d_r1_weight > 0:
                    real, r1 = r1_penalty(self.discriminator, x)
                    logs["r1"] = r1.detach()
                else:
                    real, r1 = self.discriminator(x.detach()), 0.0
                fake = self.discriminator(x_rec.detach())
                d_loss = hinge_d_loss(real.float(), fake.float())
                self.step_optimizer("d", d_loss + 0.5 * self.d_r1_weight * r1)
            logs.update(
                d_loss=d_loss.detach(), logits_real=real.detach().mean(), logits_fake=fake.detach().mean()
            )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=b)
        self.log("train/rec_loss", rec.detach(), prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in {**logs, **rec_logs}.items()}, batch_size=b)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        latents, _, logs = self.bottleneck(self.encoder(x))
        x_rec = self.decoder(latents)
        b = x.shape[0]
        self.log("val/rec_loss", self.pixel_loss(x, x_rec), sync_dist=True, batch_size=b)
        self.log("val/psnr", psnr(x, x_rec).mean(), sync_dist=True, batch_size=b)
        self.log_dict({f"val/{k}": v for k, v in logs.items() if k == "kl"}, sync_dist=True, batch_size=b)


class VQAutoencoder(Autoencoder):
    """VQ-VAE (``discriminator=None``) and VQGAN: an encoder, a vector quantizer, a decoder.

    Args:
        quantizer: ``networks.quantizer.VectorQuantizer`` with ``dim`` equal to the encoder's
            output channels and the decoder's input channels.
        **kwargs: the :class:`Autoencoder` options.

    Validation logs ``val/codebook_usage`` (fraction of the codes used at least once over the
    whole validation epoch, all ranks) and ``val/perplexity`` (of that epoch's code histogram).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: VectorQuantizer, **kwargs):
        if not (encoder.out_channels == quantizer.dim == decoder.in_channels):
            raise ConfigError(
                f"the encoder gives {encoder.out_channels} channels, the quantizer expects dim {quantizer.dim} "
                f"and the decoder takes {decoder.in_channels}: set all three to the same latent dimension"
            )
        super().__init__(encoder, decoder, **kwargs)
        self.save_hyperparameters()
        self.quantizer = quantizer
        self.latent_channels, self.codebook_size = quantizer.dim, quantizer.codebook_size
        self.register_buffer("val_counts", torch.zeros(quantizer.codebook_size), persistent=False)

    def bottleneck(self, h: Tensor) -> tuple[Tensor, Tensor, dict]:
        q = self.quantizer(h)
        self._last_counts = q.counts
        logs = {"commit_loss": q.commit_loss}
        if self.training:
            logs["perplexity"] = perplexity(q.counts)
        return q.latents, q.loss, logs

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> (quantized latents, code indices); the codebook is left as it is."""
        q = self.quantizer(self.encoder(images), update=False)
        return q.latents, q.indices

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.lookup(indices))

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images -> the encoder's continuous, pre-quantisation latents (for latent diffusion)."""
        return self.encoder(images)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Pre-quantisation latents -> images: quantised (codebook unchanged), then decoded."""
        return self.decode(self.quantizer(latents, update=False).latents)

    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_counts += self._last_counts

    def on_validation_epoch_end(self) -> None:
        counts = self.val_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        if counts.sum() > 0:
            self.log("val/codebook_usage", usage(counts), rank_zero_only=True)
            self.log("val/perplexity", perplexity(counts), rank_zero_only=True)


class KLAutoencoder(Autoencoder):
    """The KL autoencoder of latent diffusion (``AutoencoderKL``): the encoder gives the mean and
    log-variance of a diagonal Gaussian posterior; training decodes a sample of it and adds
    ``kl_weight`` times its KL divergence from N(0, I).

    ``train/kl`` is the KL per image, summed over the latent elements (nats). The loss adds
    ``kl_weight * kl / (pixels per image)``: with the pixel loss a per-pixel mean, this is
    latent-diffusion's weighting (its reconstruction loss is a per-image sum), so its
    ``kl_weight: 1e-6`` means the same here.

    Args:
        latent_channels: channels of the latent; the encoder gives twice that (mean, log-variance).
        kl_weight: weight of the KL term (latent-diffusion: 1e-6).
        **kwargs: the :class:`Autoencoder` options.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_channels: int = 4,
        kl_weight: float = 1e-6,
        **kwargs,
    ):
        if encoder.out_channels != 2 * latent_channels or decoder.in_channels != latent_channels:
            raise ConfigError(
                f"a KL autoencoder with latent_channels {latent_channels} needs an encoder with out_channels "
                f"{2 * latent_channels} (mean and log-variance) and a decoder with in_channels {latent_channels}; "
                f"they have {encoder.out_channels} and {decoder.in_channels}"
            )
        super().__init__(encoder, decoder, **kwargs)
        self.save_hyperparameters()
        self.latent_channels, self.kl_weight = latent_channels, kl_weight

    def posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def kl(mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mean, exp(logvar)) || N(0, I)) per image, summed over the latent elements."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)

    def bottleneck(self, h: Tensor) -> tuple[Tensor, Tensor, dict]:
        mean, logvar = self.posterior(h)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        kl = self.kl(mean, logvar).mean()
        pixels = 3 * (self.downsample_factor * mean.shape[-1]) * (self.downsample_factor * mean.shape[-2])
        return z.to(h.dtype), self.kl_weight * kl / pixels, {"kl": kl.detach()}

    def encode(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """The posterior's mean (``sample``: a draw from it)."""
        mean, logvar = self.posterior(self.encoder(images))
        if not sample:
            return mean
        return mean + torch.randn(mean.shape, generator=generator, device=mean.device) * (0.5 * logvar).exp()

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images -> the posterior's mean (for latent diffusion)."""
        return self.encode(images)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decode(latents)


def load_autoencoder(
    path: str, map_location: str | torch.device = "cpu", option: str | None = None
) -> Autoencoder:
    """A trained autoencoder from its checkpoint, frozen and in eval mode, with no trainer.

    The perceptual loss and its weights file are not needed to encode or decode, and are not
    loaded (the checkpoint may come from a machine whose weights path does not exist here).
    ``option`` names the setting the path came from, for the error when it does not exist."""
    if not path or not os.path.isfile(path):
        raise MissingFileError(
            f"{option + ': ' if option else ''}autoencoder checkpoint {path!r} not found: train one first "
            "(configs/autoencoder/) and give its checkpoints/last.ckpt or best-*.ckpt"
        )
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    name = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]  # recorded by the CLI
    classes = {c.__name__: c for c in (VQAutoencoder, KLAutoencoder)}
    cls = classes.get(name) or (KLAutoencoder if "latent_channels" in hparams else VQAutoencoder)
    model = cls.load_from_checkpoint(
        path, map_location=map_location, weights_only=False, perceptual_weight=0.0, perceptual_path=None
    )
    return model.requires_grad_(False).eval()


class FrozenAutoencoderUser:
    """Mixin of the methods that build on a trained autoencoder (token priors, latent diffusion):
    it is loaded frozen from its checkpoint path, stays in eval mode whatever mode the method is
    put in, and its weights stay out of the method's checkpoints (which store the path)."""

    def attach_autoencoder(
        self, path: str, option: str = "model.init_args.autoencoder", vq: bool = False
    ) -> Autoencoder:
        autoencoder = load_autoencoder(path, option=option)
        if vq and not isinstance(autoencoder, VQAutoencoder):
            raise ConfigError(
                f"{option}: {path!r} is a {type(autoencoder).__name__}, but a token prior needs discrete codes: "
                "give a VQ autoencoder's checkpoint (configs/autoencoder/vqgan_shapes.yaml or vqvae_shapes.yaml), "
                "or train latent diffusion (configs/diffusion/latent_shapes.yaml) on this one"
            )
        self.autoencoder = keep_out_of_checkpoints(autoencoder)
        return autoencoder

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "autoencoder", None) is not None:
            self.autoencoder.eval()  # frozen: batch-norm statistics and dropout never change
        return self
