"""Samplers and schedules against diffusers' schedulers: same model, same noise, same result."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from networks.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    dynamic_threshold,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    trailing_timesteps,
)

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


def test_trailing_grid_has_exactly_the_asked_steps_for_every_count():
    reference = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    for steps in range(1, T + 1):
        ts = trailing_timesteps(T, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0, steps
        assert all(a > b for a, b in zip(ts, ts[1:])), steps
        reference.set_timesteps(steps)  # diffusers' own grid has the float-arange flaw at 62 counts
        if len(reference.timesteps) == steps:
            assert ts == reference.timesteps.tolist(), steps
    with pytest.raises(ValueError, match="between 1 and 1000"):
        trailing_timesteps(T, T + 1)


def bounded_x0(x, t):
    """A stand-in network's clean-image estimate, bounded like a real one (|x0| <= 1.5)."""
    tf = t.to(x.dtype).view(-1, 1, 1, 1) / T
    return torch.tanh(0.7 * x + 0.3 * torch.sin(3 * x.flip(-1))) * (0.5 + tf)


def as_prediction(schedule, prediction, x, t):
    """The stand-in's output in the parametrisation ``prediction`` (eps, x0 or v)."""
    x0 = bounded_x0(x, t)
    alpha, sigma = schedule.alpha_sigma(t, x)
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]


DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DIFFUSERS_SCHEDULERS = {
    "ddpm": lambda kind, pred: DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind], clip_sample=False,
        timestep_spacing="trailing", prediction_type=DIFFUSERS_PREDICTION[pred]),
    "ddim": lambda kind, pred: DDIMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind], clip_sample=False, timestep_spacing="trailing",
        set_alpha_to_one=True, prediction_type=DIFFUSERS_PREDICTION[pred]),
    "dpmpp_2m": lambda kind, pred: DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[kind], algorithm_type="dpmsolver++", solver_order=2,
        timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True,
        prediction_type=DIFFUSERS_PREDICTION[pred]),
}  # fmt: skip


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_sampler_and_prediction_matches_diffusers_in_image_space(sampler, kind, prediction):
    """Every prediction target through every sampler on both schedules. The stand-in network's x0 is
    bounded, so the samples are O(1) and a tight absolute tolerance separates a wrong coefficient
    from float noise (an eps stand-in drives cosine samples to ~3e4)."""
    s = NoiseSchedule(T, kind)
    ref = DIFFUSERS_SCHEDULERS[sampler](kind, prediction)
    ref.betas, ref.alphas_cumprod = s.betas.clone(), s.alphas_cumprod.clone()  # float64 tables on both sides
    ref.alphas = 1 - ref.betas
    if sampler == "dpmpp_2m":  # its tables are derived at construction
        ref.alpha_t, ref.sigma_t = s.alphas_cumprod.sqrt(), (1 - s.alphas_cumprod).sqrt()
        ref.lambda_t, ref.sigmas = (
            ref.alpha_t.log() - ref.sigma_t.log(),
            ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt(),
        )

    def denoise(x, t):
        return s.to_x0_eps(prediction, as_prediction(s, prediction, x, t), x, t)

    # 13 does not divide T; diffusers' DDIM steps to ``t - T // steps`` instead of the grid's next
    # timestep, which is off the grid unless the count divides T, so DDIM is compared at 20
    steps = 20 if sampler == "ddim" else 13
    a = SAMPLERS[sampler](denoise, s, _noise(), steps=steps, eta=1.0 if sampler == "ddim" else 0.0,
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    ref.set_timesteps(steps)
    x, g = _noise(), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        out = as_prediction(s, prediction, x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        kwargs = {"generator": g} if sampler != "dpmpp_2m" else {}
        x = ref.step(out, t, x, **kwargs, **({"eta": 1.0} if sampler == "ddim" else {})).prev_sample
    assert a.abs().max() < 3, a.abs().max()
    assert torch.allclose(a, x.to(a.dtype), rtol=1e-5, atol=1e-5), (a - x).abs().max()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_samplers_run_at_step_counts_that_do_not_divide_the_timesteps(sampler):
    s = NoiseSchedule(T, "cosine")

    def denoise(x, t):
        return s.to_x0_eps("x0", bounded_x0(x, t), x, t)

    for steps in (61, 103, 121, 7, 999):
        out = SAMPLERS[sampler](denoise, s, _noise(), steps=steps, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all() and out.abs().max() < 3, steps


def test_samplers_read_the_schedule_from_the_device_once_per_call(monkeypatch):
    """Step coefficients are host floats: no ``.item()`` in the loop (each would wait for a GPU)."""
    s = NoiseSchedule(T, "cosine")
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counted("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", tolist))
    for sampler in SAMPLERS.values():
        sampler(lambda x, t: s.to_x0_eps("x0", bounded_x0(x, t), x, t), s, _noise(), steps=20)
    assert calls == {"item": 0, "tolist": len(SAMPLERS)}


@pytest.mark.parametrize("kind", ["linear"])  # the cosine schedule: in image space, above
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


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_min_snr_weights_are_the_closed_forms_and_agree_across_targets(kind):
    """Hang et al. 2023: with SNR = abar / (1 - abar), the weights are min(SNR, g) / SNR for eps and
    min(SNR, g) for x0, which makes the two weighted losses one and the same loss on x0. v gets
    min(SNR + 1, g) / (SNR + 1): the same loss on x0 weighted by min(SNR + 1, g), never zero."""
    s, gamma = NoiseSchedule(T, kind), 5.0
    t = torch.tensor([0, 1, 50, 300, 500, 700, 999])
    abar = s.alphas_cumprod[t]
    snr = abar / (1 - abar)
    closed = {
        "eps": snr.clamp(max=gamma) / snr,
        "x0": snr.clamp(max=gamma),
        "v": (snr + 1).clamp(max=gamma) / (snr + 1),
    }
    for prediction, expected in closed.items():
        assert torch.allclose(s.loss_weight(prediction, t, gamma).double(), expected, rtol=1e-6), prediction
    assert torch.equal(s.loss_weight("eps", t, None), torch.ones(len(t)))
    # the same wrong estimate, measured in each target's space and weighted, is the same loss
    x0, eps = (
        torch.randn(len(t), 3, 4, 4, dtype=torch.float64),
        torch.randn(len(t), 3, 4, 4, dtype=torch.float64),
    )
    x_t = s.add_noise(x0, eps, t)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    alpha, sigma = s.alpha_sigma(t, x_t)
    eps_hat = (x_t - alpha * x0_hat) / sigma
    outputs = {"x0": x0_hat, "eps": eps_hat, "v": alpha * eps_hat - sigma * x0_hat}
    losses = {
        p: (outputs[p] - s.target(p, x0, eps, t)).pow(2).flatten(1).mean(1) * closed[p] for p in outputs
    }
    assert torch.allclose(losses["eps"], losses["x0"], rtol=1e-6)
    x0_loss = (x0_hat - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(losses["v"], x0_loss * (snr + 1).clamp(max=gamma), rtol=1e-6)


def test_v_weight_is_not_zero_at_zero_snr():
    """Under a zero-terminal-SNR schedule the paper's v weight min(SNR, g) / (SNR + 1) would be 0
    at the last step, which every sampler starts from; ours is the plain v loss there."""
    s = NoiseSchedule(T, "cosine", zero_terminal_snr=True)
    t = torch.tensor([T - 1, T - 2])
    assert s.snr(t)[0] == 0
    assert torch.allclose(s.loss_weight("v", t, 5.0), torch.ones(2))


# ------------------------------------------------------------------ conditioning: schedules that sample right
ZERO_SNR_KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_scaled_linear_and_zero_terminal_snr_schedules_match_diffusers(kind, zero_snr):
    ends = {"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}  # Stable Diffusion's
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=ZERO_SNR_KINDS[kind], rescale_betas_zero_snr=zero_snr,
                        **ends)  # fmt: skip
    s = NoiseSchedule(T, kind, zero_terminal_snr=zero_snr)
    assert torch.allclose(s.betas.float(), ref.betas, atol=1e-6, rtol=1e-4)  # diffusers rescales in float32
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)
    if zero_snr:
        assert s.alphas_cumprod[-1] == 0
        assert torch.isclose(s.alphas_cumprod[0], NoiseSchedule(T, kind).alphas_cumprod[0], rtol=1e-12)


def test_cfg_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from networks.diffusion import rescale_guidance

    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    guided = uncond + 7.5 * (cond - uncond)
    for phi in (0.0, 0.7, 1.0):
        assert torch.allclose(rescale_guidance(guided, cond, phi), rescale_noise_cfg(guided, cond, phi), atol=1e-6)
    assert torch.allclose(rescale_guidance(guided, cond, 1.0).std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5)


MU, S = 0.3, 0.5  # Gaussian data, each pixel N(MU, S^2): its optimal denoiser is known in closed form


def _gaussian_network(schedule, prediction, error):
    """The exact posterior mean of Gaussian data, given as a network predicting ``prediction``
    with a relative ``error`` in its output, then converted back as the method does."""

    def denoise(x, t):
        a, sg = schedule.alpha_sigma(t, x)
        x0 = MU + a * S**2 / (a**2 * S**2 + sg**2) * (x - a * MU)
        eps = (x - a * x0) / sg
        out = {"eps": eps, "v": a * eps - sg * x0, "x0": x0}[prediction] * (1 + error)
        return schedule.to_x0_eps(prediction, out, x, t)

    return denoise


def _exact_sample(schedule, noise):
    """Where the probability-flow ODE takes ``noise`` at the first sampling step: for Gaussian data
    it maps the noise's quantile to the data's."""
    abar = float(schedule.alphas_cumprod[-1])
    return MU + S * (noise - abar**0.5 * MU) / (abar * S**2 + 1 - abar) ** 0.5


@pytest.mark.parametrize(("kind", "tolerance"), [("cosine", {"dpmpp_2m": 0.01, "ddim": 0.06}),
                                                 ("scaled_linear", {"dpmpp_2m": 0.07, "ddim": 0.1}),
                                                 ("linear", {"dpmpp_2m": 0.04, "ddim": 0.1})])  # fmt: skip
def test_samplers_land_on_the_exact_sample_in_20_steps_under_v_prediction_and_zero_terminal_snr(kind, tolerance):
    """With a 1% error in the network's output, each deterministic sampler ends within the stated RMS
    distance of the exact sample, and DDPM's samples have the data's mean and spread. Under
    eps-prediction on the cosine schedule (alpha = 5e-5 at the first step) the same 1% error
    is multiplied by 1 / alpha in x0: the samples end far from the exact ones."""
    noise = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = NoiseSchedule(T, kind, zero_terminal_snr=True)
    exact = _exact_sample(s, noise)
    for name, tol in tolerance.items():
        out = SAMPLERS[name](_gaussian_network(s, "v", 0.01), s, noise, steps=20)
        assert ((out - exact) ** 2).mean().sqrt() < tol, name
    x = sample_ddpm(_gaussian_network(s, "v", 0.01), s, noise, steps=50, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean() - MU) < 0.02 and abs(x.std() - S) < 0.08
    ill = NoiseSchedule(T, "cosine")
    out = sample_dpmpp_2m(_gaussian_network(ill, "eps", 0.01), ill, noise, steps=20)
    assert ((out - _exact_sample(ill, noise)) ** 2).mean().sqrt() > 1.0
