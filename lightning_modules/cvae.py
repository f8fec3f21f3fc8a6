"""The text-conditional VAE (CVAE) as a text-to-image method: a posterior ``q(z | image, text)``,
a learned prior ``p(z | text)`` in place of N(0, I), and a decoder ``p(image | z, text)``.
``generate`` samples ``z`` from the prior of the prompt and decodes it."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from networks.cvae import diagonal_gaussian_kl
from networks.errors import ConfigError
from networks.noise import randn

from .base import TextToImageModule


def _adamw(params):
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0, fused=True)


class ConditionalVAE(TextToImageModule):
    """Loss per image: ``rec + beta_t * KL(q(z | x, c) || p(z | c)) / pixels``, where ``rec`` is the
    per-pixel mean squared (``l2``) or absolute (``l1``) error. With ``l2`` this is the negative
    ELBO per pixel of a Gaussian likelihood with variance ``beta / 2``: a smaller ``beta`` trusts
    the pixels more (sharper, a posterior further from the prior).

    Args:
        net: ``networks.cvae.ConditionalVAENet`` (posterior, prior, decoder).
        text_encoder: the injected text encoder; its pooled vector conditions all three parts.
        rec_loss: ``l2`` or ``l1``.
        beta: weight of the KL term (per pixel, see above).
        free_bits: nats per latent dimension (mean over the batch) below which the KL of that
            dimension is not penalised (Kingma et al. 2016); 0 disables.
        kl_anneal_steps: ramp ``beta`` linearly from 0 over this many steps; 0 disables.
        temperature: default scale of the prior's standard deviation in ``generate``.
        optimizer, lr_scheduler: factories for all trainable parameters.
    """

    def __init__(
        self,
        net: nn.Module,
        text_encoder: nn.Module,
        rec_loss: str = "l2",
        beta: float = 1.0,
        free_bits: float = 0.0,
        kl_anneal_steps: int = 0,
        temperature: float = 1.0,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if rec_loss not in ("l1", "l2"):
            raise ConfigError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        text_dim = getattr(text_encoder, "dim", None)
        if text_dim is not None and text_dim != net.text_dim:
            raise ConfigError(
                f"the text encoder gives {text_dim}-d vectors but the CVAE net expects text_dim {net.text_dim}; "
                f"set the net's text_dim to {text_dim}"
            )
        self.net, self.text_encoder = net, text_encoder
        self.rec_kind, self.beta, self.free_bits = rec_loss, beta, free_bits
        self.kl_anneal_steps, self.temperature = kl_anneal_steps, temperature
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    @property
    def image_size(self) -> int:
        return self.net.image_size

    def beta_at(self, step: int) -> float:
        if not self.kl_anneal_steps:
            return self.beta
        return self.beta * min(1.0, step / self.kl_anneal_steps)

    def losses(self, batch: dict, noise: Tensor | None = None, beta: float | None = None) -> dict[str, Tensor]:
        """``loss`` (``rec_loss`` + ``beta`` x the KL term per pixel; ``beta`` defaults to the
        annealed value at this step), ``rec_loss``, ``kl`` (nats per image) for a batch."""
        x = batch["image"]
        text = self.text_encoder(list(batch["caption"])).pooled
        mu_q, logvar_q = self.net.posterior(x, text)
        mu_p, logvar_p = self.net.prior(text)
        noise = torch.randn_like(mu_q) if noise is None else noise
        z = mu_q + noise * (0.5 * logvar_q).exp()
        x_rec = self.net.decode(z, text)
        diff = x_rec.float() - x.float()
        rec = diff.pow(2).mean() if self.rec_kind == "l2" else diff.abs().mean()
        kl_dims = diagonal_gaussian_kl(mu_q.float(), logvar_q.float(), mu_p.float(), logvar_p.float())
        kl = kl_dims.sum(1).mean()
        penalised = kl_dims.mean(0).clamp_min(self.free_bits).sum() if self.free_bits else kl
        pixels = x[0].numel()
        beta = self.beta_at(self.global_step) if beta is None else beta
        loss = rec + beta * penalised / pixels
        return {"loss": loss, "rec_loss": rec, "kl": kl, "kl_term": penalised / pixels}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.losses(batch)
        b = len(batch["caption"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log_dict({"train/rec_loss": out["rec_loss"].detach(), "train/kl": out["kl"].detach(),
                       "train/beta": self.beta_at(self.global_step)}, batch_size=b)  # fmt: skip
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss`` at the full ``beta`` on a noise fixed per batch, so that the same weights
        score the same at any step and validations compare (a checkpoint monitor then does not
        prefer the annealing phase); ``val/loss_annealed`` is the loss at this step's ``beta``."""
        x = batch["image"]
        g = torch.Generator(device=x.device).manual_seed(batch_idx)
        noise = torch.randn((x.shape[0], self.net.latent_dim), generator=g, device=x.device)
        out = self.losses(batch, noise, beta=self.beta)
        kl_term = out.pop("kl_term")
        out["loss_annealed"] = out["rec_loss"] + self.beta_at(self.global_step) * kl_term
        b = len(batch["caption"])
        self.log_dict({f"val/{k}": v for k, v in out.items()}, sync_dist=True, batch_size=b)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return self.optimizer_with_scheduler(self.optimizer_factory(params), self.lr_scheduler_factory)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        temperature: float | None = None,
        **unknown,
    ) -> Tensor:
        """Images for ``prompts``: ``z ~ N(mu(c), (temperature * sigma(c))^2)`` from the text prior,
        decoded. ``temperature`` 0 decodes the prior's mean (one image per prompt)."""
        self.check_sampling(unknown)
        temperature = self.temperature if temperature is None else temperature
        text = self.text_encoder(list(prompts)).pooled
        mu, logvar = self.net.prior(text)
        eps = randn(mu.shape, self.generator(seed, self.device), device=self.device)
        z = mu + temperature * eps * (0.5 * logvar).exp()
        return self.net.decode(z, text).clamp(-1, 1)
