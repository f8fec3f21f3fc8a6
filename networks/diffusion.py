"""Diffusion maths, kept apart from any network: noise schedules, target conversions,
guidance-ready denoisers and samplers as short functions.

Notation: ``x_t = alpha_t * x_0 + sigma_t * eps`` with ``alpha_t = sqrt(abar_t)`` and
``sigma_t = sqrt(1 - abar_t)``; ``t`` is an integer timestep in ``[0, T)``.

A *denoise function* maps ``(x_t (b, c, h, w), t (b,) long) -> (x0, eps)``; every sampler
takes one, so guidance, thresholding and the network's prediction target are settled before
the sampler sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .noise import Generators, randn

DenoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Prediction = Literal["eps", "x0", "v"]


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule of Nichol & Dhariwal (2021), betas clipped at ``max_beta``."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), max_beta) for i in range(timesteps)],
        dtype=torch.float64,
    )


def scaled_linear_betas(timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Latent diffusion's schedule: betas linear in their square root (terminal abar about 0.0047
    at T = 1000)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: shift and scale ``sqrt(abar)`` so that it keeps its first value and is exactly 0
    at the last step (pure noise: zero signal-to-noise ratio); the betas that give it."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


Schedule = Literal["linear", "cosine", "scaled_linear"]
BETAS = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


class NoiseSchedule(nn.Module):
    """A discrete-time variance-preserving schedule; all tables are float64 buffers.

    Args:
        timesteps: number of training timesteps ``T``.
        kind: ``linear`` (DDPM), ``cosine`` (improved DDPM) or ``scaled_linear`` (latent diffusion).
        zero_terminal_snr: rescale it so that ``abar = 0`` at the last step (Lin et al.): training
            then sees pure noise at ``t = T - 1``, where sampling starts. Needs a prediction other
            than ``eps`` (at zero SNR the noise says nothing about the image).
    """

    def __init__(self, timesteps: int = 1000, kind: Schedule = "cosine", zero_terminal_snr: bool = False):
        super().__init__()
        betas = BETAS[kind](timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.timesteps, self.kind, self.zero_terminal_snr = timesteps, kind, zero_terminal_snr
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)

    def abar(self, t: Tensor) -> Tensor:
        """``abar_t`` for integer ``t``; ``t = -1`` means the clean image (``abar = 1``)."""
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return table[t.long() + 1]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` shaped (b, 1, 1, 1) in the dtype of ``like``."""
        abar = self.abar(t).view(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt().to(like.dtype), (1 - abar).sqrt().to(like.dtype)

    def snr(self, t: Tensor) -> Tensor:
        abar = self.abar(t)
        return abar / (1 - abar)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, prediction: Prediction, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a network predicting ``prediction`` is trained to output."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def to_x0_eps(
        self, prediction: Prediction, output: Tensor, x: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Convert a network output to ``(x0, eps)`` at ``x_t``."""
        alpha, sigma = self.alpha_sigma(t, x)
        if prediction == "eps":
            return (x - sigma * output) / alpha, output
        if prediction == "x0":
            return output, (x - alpha * output) / sigma.clamp(min=1e-8)
        return alpha * x - sigma * output, sigma * x + alpha * output

    def loss_weight(self, prediction: Prediction, t: Tensor, min_snr_gamma: float | None) -> Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023) for the MSE on ``prediction``; ones if gamma is None.

        eps and x0 get the paper's min(SNR, g) / SNR and min(SNR, g). For v the paper's
        min(SNR, g) / (SNR + 1) is zero at zero SNR, so under a zero-terminal-SNR schedule the
        first step of every sampler would be untrained; v gets min(SNR + 1, g) / (SNR + 1)
        instead (diffusers' convention): the plain v loss where SNR + 1 <= g, capped above."""
        if min_snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        v_weight = (snr + 1).clamp(max=min_snr_gamma) / (snr + 1)
        weight = {"eps": clipped / snr, "x0": clipped, "v": v_weight}[prediction]
        return weight.float()


def rescale_guidance(guided: Tensor, conditional: Tensor, rescale: float) -> Tensor:
    """CFG rescale (Lin et al. 2024, Sec. 3.4): bring the guided prediction's standard deviation
    (per sample) back to the conditional one's, blended by ``rescale`` in [0, 1] (paper: 0.7).
    It keeps a high guidance scale from over-exposing images under a zero-terminal-SNR schedule."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.dim()))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: clip to the per-sample percentile ``s >= 1`` of |x0|, divide by s."""
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def trailing_timesteps(total: int, steps: int) -> list[int]:
    """``steps`` timesteps from ``total - 1`` down, evenly spaced ("trailing" spacing):
    ``round(total - i * total / steps) - 1`` for ``i < steps``.

    Strictly decreasing, in ``[0, total)``, exactly ``steps`` long for any ``1 <= steps <= total``.
    The float steps are those of numpy's ``arange`` (what diffusers' ``timestep_spacing="trailing"``
    uses), so the grids agree, ties included; diffusers takes the whole ``arange``, which for 62 of
    the counts 1..1000 has one more element that rounds to ``t = -1``.
    """
    if not 1 <= steps <= total:
        raise ValueError(
            f"sampling steps must be between 1 and {total} (the training timesteps), got {steps}"
        )
    delta = (total - total / steps) - total  # numpy's arange step, rounding included
    return [int(round(total + i * delta)) - 1 for i in range(steps)]


def _randn(x: Tensor, generator: Generators) -> Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


class _HostSchedule:
    """The schedule's ``abar`` on the host, read from the device once per sampling call, so the
    coefficients of every step are Python floats (no device synchronisation inside the loop)."""

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.table = schedule.alphas_cumprod.tolist()
        self.ts = trailing_timesteps(schedule.timesteps, steps)

    def abar(self, t: int) -> float:
        return 1.0 if t < 0 else self.table[t]

    def steps(self) -> list[tuple[int, int]]:
        """``(t, prev)`` for every step; ``prev = -1`` (the clean image) after the last."""
        return list(zip(self.ts, self.ts[1:] + [-1]))


def _full(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def step_grid(schedule: NoiseSchedule, steps: int) -> list[tuple[int, int, float, float]]:
    """``(t, prev, abar_t, abar_prev)`` of every step of a ``steps``-step trailing grid; ``prev = -1``
    (the clean image, ``abar = 1``) after the last."""
    host = _HostSchedule(schedule, steps)
    return [(t, prev, host.abar(t), host.abar(prev)) for t, prev in host.steps()]


def ddim_step(x0: Tensor, eps: Tensor, abar_t: float, abar_prev: float, eta: float) -> tuple[Tensor, float]:
    """One DDIM step from ``x_t`` as a Gaussian: ``x_prev ~ N(mean, sigma^2 I)``; returns
    ``(mean, sigma)``. ``sigma`` is ``eta`` times DDPM's posterior standard deviation, 0 at the last
    step (``abar_prev = 1``) whatever ``eta``: that step is deterministic."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    mean = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
    return mean, sigma


def ddim_log_prob(x_prev: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """Log-density of the step taken, ``log N(x_prev; mean, sigma^2 I)`` (b,), averaged over the
    elements of a sample rather than summed (DDPO's convention), so that a policy ratio does not
    scale with the image size. Needs ``sigma > 0``."""
    log_density = -((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


@torch.no_grad()
def sample_ddpm(
    denoise: DenoiseFn, schedule: NoiseSchedule, noise: Tensor, steps: int | None = None, generator=None, **_
) -> Tensor:
    """Ancestral sampling with the posterior variance (DDPM, "fixed small"); ``steps`` may skip timesteps."""
    host = _HostSchedule(schedule, steps or schedule.timesteps)
    x = noise
    for t, prev in host.steps():
        x0, _ = denoise(x, _full(t, x))
        abar_t, abar_prev = host.abar(t), host.abar(prev)
        alpha_t, beta_t = abar_t / abar_prev, 1 - abar_t / abar_prev
        mean = (abar_prev**0.5 * beta_t / (1 - abar_t)) * x0 + (
            alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        ) * x
        if t > 0:
            variance = max(beta_t * (1 - abar_prev) / (1 - abar_t), 1e-20)
            mean = mean + variance**0.5 * _randn(x, generator)
        x = mean
    return x


@torch.no_grad()
def sample_ddim(
    denoise: DenoiseFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator=None,
    **_,
) -> Tensor:
    """DDIM (Song et al. 2021); ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like."""
    x = noise
    for t, _, abar_t, abar_prev in step_grid(schedule, steps):
        x0, eps = denoise(x, _full(t, x))
        x, sigma = ddim_step(x0, eps, abar_t, abar_prev, eta)
        if eta > 0:
            x = x + sigma * _randn(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: DenoiseFn, schedule: NoiseSchedule, noise: Tensor, steps: int = 20, generator=None, **_
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep, second order, first order at the first and last step."""
    host = _HostSchedule(schedule, steps)
    x, previous, h_previous = noise, None, None

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        abar = host.abar(t)
        alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        if sigma == 0 or alpha == 0:  # the clean image; pure noise (a zero-terminal-SNR schedule)
            return alpha, sigma, math.inf if sigma == 0 else -math.inf
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    for t, prev in host.steps():
        x0, _ = denoise(x, _full(t, x))
        _, sigma_s, lambda_s = alpha_sigma_lambda(t)
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(prev)
        h = lambda_t - lambda_s
        phi = -math.expm1(-h)  # 1 - e^{-h}; 1 at the final (sigma = 0) step
        if previous is None or prev == -1:
            d = x0
        else:
            r = h_previous / h
            d = x0 + (x0 - previous) / (2 * r)
        x = (sigma_t / sigma_s) * x + alpha_t * phi * d
        previous, h_previous = x0, h
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}
Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
