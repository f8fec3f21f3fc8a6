"""Samplers and schedules against diffusers' schedulers: same model, same noise, same result."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from networks.diffusion import NoiseSchedule, dynamic_threshold, sample_ddim, sample_ddpm, sample_dpmpp_2m

T = 1000
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def fake_eps(x, t):
    """A smooth, deterministic stand-in for a trained network (depends on x and t)."""
    tf = t.to(x.dtype).view(-1, 1, 1, 1) / T
    return torch.tanh(0.7 * x + 0.3 * torch.sin(3 * x.flip(-1))) * (0.5 + tf)


def ours(schedule):
    def denoise(x, t):
        return schedule.to_x0_eps("eps", fake_eps(x, t), x, t)

    return denoise


def run_diffusers(scheduler, noise, steps, generator=None, **step_kw):
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        eps = fake_eps(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x


def _noise():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_values_match(kind):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind])
    s = NoiseSchedule(T, kind)
    assert torch.allclose(s.betas.float(), ref.betas, atol=1e-6)
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_matches_diffusers(kind):
    s = NoiseSchedule(T, kind)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind], clip_sample=False,
                        timestep_spacing="trailing")  # fmt: skip
    ref.betas, ref.alphas_cumprod = s.betas.clone(), s.alphas_cumprod.clone()
    ref.alphas = 1 - ref.betas
    for steps in (T, 50):
        a = sample_ddpm(ours(s), s, _noise(), steps=steps, generator=torch.Generator().manual_seed(1))
        b = run_diffusers(ref, _noise(), steps, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (steps, (a - b).abs().max())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(eta):
    s = NoiseSchedule(T, "linear")
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, timestep_spacing="trailing",
                        set_alpha_to_one=True)  # fmt: skip
    ref.alphas_cumprod = s.alphas_cumprod.clone()
    for steps in (50, 20):
        a = sample_ddim(
            ours(s), s, _noise(), steps=steps, eta=eta, generator=torch.Generator().manual_seed(2)
        )
        b = run_diffusers(ref, _noise(), steps, generator=torch.Generator().manual_seed(2), eta=eta)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (steps, (a - b).abs().max())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [20, 7])
def test_dpmpp_2m_matches_diffusers(kind, steps):
    s = NoiseSchedule(T, kind)
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind], algorithm_type="dpmsolver++", solver_order=2,
        timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True,
    )  # fmt: skip
    a = sample_dpmpp_2m(ours(s), s, _noise(), steps=steps)
    b = run_diffusers(ref, _noise(), steps)
    assert torch.allclose(a, b.to(a.dtype), rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_dynamic_threshold_bounds_and_keeps_small_values():
    x = torch.tensor([[0.2, -0.5, 0.9, 0.1], [3.0, -4.0, 0.5, 2.0]]).view(2, 1, 2, 2)
    y = dynamic_threshold(x, 0.99)
    assert torch.equal(y[0], x[0])  # percentile below 1: unchanged
    assert y[1].abs().max() <= 1 and torch.all(torch.sign(y[1]) == torch.sign(x[1]))


def test_conversions_round_trip():
    s = NoiseSchedule(T, "cosine")
    x0, eps = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, eps, t)
    for pred in ("eps", "x0", "v"):
        r0, re = s.to_x0_eps(pred, s.target(pred, x0, eps, t), xt, t)
        assert torch.allclose(r0, x0, atol=1e-6) and torch.allclose(re, eps, atol=1e-6), pred
