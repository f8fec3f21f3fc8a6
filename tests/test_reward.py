"""Reward fine-tuning (DDPO with group-relative advantages): the step log-probability, what it
learns, what the anchor holds, where gradients flow, and which prompts and checkpoints it takes."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.shapes import held_out_scene, heldout_prompts
from lightning_modules.diffusion import TextToImageDiffusion
from lightning_modules.reward import (
    RewardFineTuning,
    ShapesReward,
    ShapesTrainingPrompts,
    group_advantages,
    load_diffusion,
)
from networks.diffusion import NoiseSchedule, ddim_log_prob, ddim_step, step_grid
from networks.errors import ConfigError, MissingFileError
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet

PROMPTS = ["a red circle", "a blue square"]


def redness(images, prompts, attrs):
    """Prefers red: the red channel's mean minus the mean of the others (b,)."""
    return images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1)


def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


class FixedPrompts:
    def __call__(self, n, rng):
        return [(PROMPTS[i % len(PROMPTS)], {}) for i in range(n)]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny 8 px diffusion checkpoint as train.py saves it (its class recorded), barely trained."""
    torch.manual_seed(0)
    unet = UNet(
        base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=16, heads=2
    )
    text = TransformerTextEncoder(width=16, depth=1, heads=2, max_length=16, tokenizer="byte")
    # leave the zero-initialised output layer, so that the policy depends on every weight
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = TextToImageDiffusion(unet, text, image_size=8, timesteps=100, sample_steps=4, guidance_scale=1.0)
    model.ema_denoiser.load_state_dict(unet.state_dict())
    model.ema_text_encoder.load_state_dict(text.state_dict())
    path = str(tmp_path_factory.mktemp("base") / "base.ckpt")
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["_class_path"] = "lightning_modules.diffusion.TextToImageDiffusion"
    torch.save(ckpt, path)
    return path


def tuner(path, **kw):
    kw = {"reward": redness, "prompts": FixedPrompts(), "prompts_per_step": 2, "group_size": 4, "sample_steps": 4,
          "optimizer": adam, **kw}  # fmt: skip
    return RewardFineTuning(path, **kw)


def fit(model, steps):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(model, DataLoader(list(range(64)), batch_size=1))
    return trainer


def mean_reward(model):
    images = model.generate(PROMPTS * 4, seed=list(range(8)))
    return float(redness(images, None, None).mean())


def test_step_log_prob_is_the_gaussian_density_of_the_step():
    schedule = NoiseSchedule(100, "cosine")
    (t, prev, abar_t, abar_prev), *_ = step_grid(schedule, 4)
    assert abar_t == pytest.approx(float(schedule.alphas_cumprod[t])) and abar_prev == pytest.approx(
        float(schedule.alphas_cumprod[prev])
    )
    x0, eps, x_prev = torch.randn(3, 2, 3, 4, 4).unbind(0)
    mean, sigma = ddim_step(x0, eps, abar_t, abar_prev, eta=1.0)
    # by hand: DDIM's mean and eta times DDPM's posterior standard deviation
    sigma_hand = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    mean_hand = abar_prev**0.5 * x0 + (1 - abar_prev - sigma_hand**2) ** 0.5 * eps
    assert sigma == pytest.approx(sigma_hand) and torch.allclose(mean, mean_hand)
    expected = torch.distributions.Normal(mean_hand, sigma_hand).log_prob(x_prev).flatten(1).mean(1)
    assert torch.allclose(ddim_log_prob(x_prev, mean, sigma), expected, atol=1e-5)
    by_hand = -((x_prev - mean_hand) ** 2) / (2 * sigma_hand**2) - np.log(sigma_hand * np.sqrt(2 * np.pi))
    assert torch.allclose(ddim_log_prob(x_prev, mean, sigma), by_hand.flatten(1).mean(1), atol=1e-5)
    # the last step (to the clean image) is deterministic whatever eta
    assert ddim_step(x0, eps, step_grid(schedule, 4)[-1][2], 1.0, eta=1.0)[1] == 0


def test_group_advantages_compare_samples_of_one_prompt():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)
    assert torch.equal(adv[4:], torch.zeros(4))  # a tied group carries no signal


def test_fine_tuning_raises_the_reward(base_ckpt):
    model = tuner(base_ckpt)
    before = mean_reward(model)
    fit(model, 8)
    after = mean_reward(model)
    assert after > before + 0.05, (before, after)


@torch.no_grad()
def _distance(model):
    return float(sum((p - p0).pow(2).sum() for p, p0 in model.trained_pairs()).sqrt())


def test_anchor_keeps_weights_near_the_start(base_ckpt):
    free, anchored = tuner(base_ckpt, anchor_weight=0.0), tuner(base_ckpt, anchor_weight=100.0)
    assert _distance(free) == 0 == _distance(anchored)  # the policy starts at the reference
    fit(free, 4)
    fit(anchored, 4)
    assert _distance(anchored) < 0.5 * _distance(free), (_distance(anchored), _distance(free))


def test_gradients_flow_only_through_the_step_log_probs(base_ckpt):
    seen = {}

    def reward(images, prompts, attrs):
        seen.update(grad_enabled=torch.is_grad_enabled(), requires_grad=images.requires_grad)
        return redness(images, prompts, attrs)

    model = tuner(base_ckpt, reward=reward, kl_weight=1.0, anchor_weight=1.0)
    L.seed_everything(0, verbose=False)
    traj = model.rollout(PROMPTS * 4)
    assert all(x.grad_fn is None and not x.requires_grad for x in traj.states)  # the chain is detached
    assert traj.log_probs[-1] is None and all(lp is not None for lp in traj.log_probs[:-1])
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.setdefault(n, g)) for n, p in model.named_parameters()
             if p.requires_grad]  # fmt: skip
    fit(model, 1)
    for h in hooks:
        h.remove()
    assert seen == {"grad_enabled": False, "requires_grad": False}  # the reward is a constant
    trained = {f"model.denoiser.{n}" for n, _ in model.model.denoiser.named_parameters()}
    assert set(grads) == trained  # the denoiser only, every one of its weights
    frozen = [model.model.ema_denoiser, model.model.text_encoder, model.model.ema_text_encoder]
    assert all(not p.requires_grad and p.grad is None for m in frozen for p in m.parameters())
    opt_params = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.model.denoiser.parameters()}


def test_objectives_agree_on_the_first_update_and_the_clip_acts_after_it(base_ckpt):
    """At the sampling weights the ratio is 1, so PPO's gradient is REINFORCE's; a second update on
    the same samples moves ratios outside a tiny clip range."""
    model = tuner(base_ckpt)
    L.seed_everything(0, verbose=False)
    prompts = PROMPTS * 4
    traj = model.rollout(prompts)
    adv = model.advantages(redness(model.decode(traj.states[-1]), prompts, None))
    k = 0
    t, _, abar_t, abar_prev = traj.steps[k]
    t_batch = torch.full((8,), t, dtype=torch.long)
    grads = []
    for objective in ("ppo", "reinforce"):
        model.objective = objective
        model.zero_grad()
        mean, sigma = ddim_step(*model.policy(prompts)(traj.states[k], t_batch), abar_t, abar_prev, model.eta)
        log_prob = ddim_log_prob(traj.states[k + 1], mean, sigma)
        assert torch.allclose(log_prob, traj.log_probs[k], atol=1e-5)  # the same weights: the same density
        loss, clipped = model.surrogate(log_prob, traj.log_probs[k], adv)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.model.denoiser.parameters()]))
        assert float(clipped) == 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    logged = fit(tuner(base_ckpt, updates_per_step=2, clip_range=1e-6), 1).callback_metrics
    assert float(logged["train/clip_fraction"]) > 0
    assert {"train/reward", "train/advantage_std", "train/anchor", "train/kl"} <= set(logged)


def test_shapes_prompts_are_training_scenes_and_the_reward_is_the_attribute_rate():
    drawn = ShapesTrainingPrompts()(500, np.random.default_rng(0))
    assert len(drawn) == 500 and not any(held_out_scene(a) for _, a in drawn)
    held = {c for c, _ in heldout_prompts("all")}
    assert not held & {c for c, _ in drawn}
    assert {a["kind"] for _, a in drawn} == {"single", "relation", "count"}
    caption, attrs = heldout_prompts("val")[0]
    from datamodules.shapes import objects_for, render

    image = torch.from_numpy(np.asarray(render(objects_for(attrs, np.random.default_rng(0)), 32))).float()
    image = image.permute(2, 0, 1) / 127.5 - 1
    blank = -torch.ones_like(image)
    r = ShapesReward()(torch.stack([image, blank]), [caption] * 2, [attrs] * 2)
    assert r.tolist()[0] == 1.0 and 0 <= r.tolist()[1] < 1


def test_init_from_must_be_a_diffusion_checkpoint(base_ckpt, tmp_path):
    with pytest.raises(MissingFileError, match="model.init_args.init_from.*train the diffusion model first"):
        RewardFineTuning(str(tmp_path / "none.ckpt"))
    other = torch.load(base_ckpt, map_location="cpu", weights_only=False)
    other["hyper_parameters"]["_class_path"] = "lightning_modules.cvae.ConditionalVAE"
    torch.save(other, tmp_path / "cvae.ckpt")
    with pytest.raises(ConfigError, match="init_from.*not a text-to-image diffusion checkpoint"):
        load_diffusion(str(tmp_path / "cvae.ckpt"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="init_from.*not a Lightning checkpoint"):
        load_diffusion(str(tmp_path / "text.ckpt"))
    with pytest.raises(ConfigError, match="eta must be > 0"):
        tuner(base_ckpt, eta=0.0)


def test_generate_keeps_the_contract_and_the_checkpoint_round_trips(base_ckpt, tmp_path):
    model = tuner(base_ckpt)
    trainer = fit(model, 2)
    a = model.generate(PROMPTS, seed=[1, 2])
    assert (
        a.shape == (2, 3, 8, 8)
        and a.abs().max() <= 1
        and torch.equal(a, model.generate(PROMPTS, seed=[1, 2]))
    )
    with pytest.raises(TypeError, match="does not take 'bogus'"):
        model.generate(PROMPTS, bogus=1)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    again = RewardFineTuning.load_from_checkpoint(tmp_path / "tuned.ckpt", weights_only=False, reward=redness,
                                                  prompts=FixedPrompts())  # fmt: skip
    assert torch.equal(again.generate(PROMPTS, seed=[1, 2]), a)
