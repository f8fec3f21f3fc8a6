"""Fine-tuning a trained text-conditional diffusion model against a reward: DDPO (Black et al.
2023) with Flow-GRPO's group-relative advantages.

The DDIM sampler with ``eta > 0`` is a Gaussian policy over its steps: each step from ``x_t``
draws ``x_prev ~ N(mean_theta(x_t), sigma_t^2 I)``. A training step samples trajectories with
the current weights (no gradient through the chain), scores the images with the reward, turns
rewards into advantages, and raises the log-probability of the steps taken in proportion to
their advantage (the clipped importance-sampled PPO objective, or plain REINFORCE), held near
the starting weights by a weight anchor and optionally a per-step KL to the starting policy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from datamodules.shapes import DATA_VERSION, caption, held_out_scene, sample_attrs, score
from networks.diffusion import ddim_log_prob, ddim_step, step_grid
from networks.errors import ConfigError, MissingFileError
from networks.noise import randn

from .base import TextToImageModule
from .diffusion import SuperResolutionDiffusion, TextToImageDiffusion

# Plain ``Callable`` so that a config can give either a function's import path or the
# ``class_path`` / ``init_args`` of a class whose instances are callable (jsonargparse reads a
# typed Callable's ``class_path`` as a factory of its return type).
Reward = Callable
"""``reward(images (b, 3, h, w) in [-1, 1], prompts, attrs) -> (b,)``; higher is better."""
PromptSampler = Callable
"""``prompts(n, rng: np.random.Generator) -> [(caption, attrs)] * n``: what the policy is asked to draw."""


class ShapesReward:
    """The analytic shapes scorer as a reward: the fraction of a prompt's attributes that the
    image satisfies (the booleans of ``datamodules.shapes.score`` without their conjunction
    ``all``), in [0, 1]. Partial credit gives a group of samples different rewards more often
    than the all-or-nothing ``all`` would."""

    def __call__(self, images: Tensor, prompts: list[str], attrs: list[dict]) -> Tensor:
        rewards = []
        for image, a in zip(images.detach().float().cpu(), attrs):
            checks = {k: v for k, v in score(image, a).items() if k != "all"}
            rewards.append(float(np.mean(list(checks.values()))))
        return torch.tensor(rewards, dtype=torch.float32)


class ShapesTrainingPrompts:
    """Captioned scenes of the shapes training distribution only: never a scene that holds a
    held-out combination (of the validation or test part), so that the reward cannot be tuned
    on what the tables measure.

    Args:
        kinds: probabilities of the scene kinds (``sample_attrs``'s); None: the data's mix.
        version: the shapes data version whose held-out split applies.
    """

    def __init__(self, kinds: dict[str, float] | None = None, version: int = DATA_VERSION):
        self.kinds, self.version = kinds, version

    def __call__(self, n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
        out = []
        for _ in range(n):
            attrs = sample_attrs(rng, self.kinds, heldout="exclude", version=self.version)
            if held_out_scene(attrs, self.version):
                raise AssertionError(f"a held-out scene was drawn as a training prompt: {attrs}")
            captions = caption(attrs, rng)
            out.append((captions[int(rng.integers(len(captions)))], attrs))
        return out


def load_diffusion(path: str, option: str = "model.init_args.init_from") -> TextToImageDiffusion:
    """A text-to-image diffusion model (pixel or latent) from a ``train.py fit`` checkpoint."""
    if not path or not os.path.isfile(path):
        raise MissingFileError(
            f"{option}: checkpoint {path!r} not found: train the diffusion model first "
            "(python train.py fit --config configs/diffusion/shapes32.yaml) and give its checkpoints/last.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        class_path = str(ckpt.get("hyper_parameters", {}).get("_class_path", ""))
    except Exception as err:  # not a torch file, or not a dict
        raise ConfigError(f"{option}: {path!r} is not a Lightning checkpoint ({err})") from err
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        cls = None
    if (
        not isinstance(cls, type)
        or not issubclass(cls, TextToImageDiffusion)
        or issubclass(cls, SuperResolutionDiffusion)
    ):
        raise ConfigError(
            f"{option}: {path!r} is not a text-to-image diffusion checkpoint ({class_path or 'no model class recorded'}): "
            "give one saved by train.py fit of lightning_modules.diffusion.TextToImageDiffusion "
            "(configs/diffusion/shapes32.yaml, latent_shapes.yaml)"
        )
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)


class Trajectory(NamedTuple):
    """Sampled trajectories, detached: ``states[k]`` is ``x_t`` before step ``k`` (``len(steps) + 1``
    states, the last one the sample), ``log_probs[k]`` (b,) the log-probability of step ``k`` under
    the weights that sampled it (None for a deterministic step)."""

    steps: list[tuple[int, int, float, float]]
    states: list[Tensor]
    log_probs: list[Tensor | None]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Flow-GRPO's group-relative advantages: ``(r - mean) / std`` within each group of
    ``group_size`` consecutive samples of one prompt (b,); 0 for a group whose rewards all tie."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class RewardFineTuning(TextToImageModule):
    """DDPO / Flow-GRPO fine-tuning of a trained :class:`TextToImageDiffusion` against a reward.

    The policy starts from the checkpoint's EMA weights (the ones that sample); the checkpoint's
    EMA networks stay frozen, out of the optimizer, as the reference policy of the anchor and the
    KL. Every training step draws ``prompts_per_step`` prompts and samples ``group_size`` images
    of each with DDIM (``eta``, ``sample_steps``, ``guidance_scale``); the batch the data module
    gives is not used (it only paces the epochs; its validation batches give ``val/loss``).
    Manual optimisation: ``updates_per_step`` optimizer steps per sampled batch, each over every
    stochastic step of the trajectories (gradients accumulated step by step).

    Args:
        init_from: checkpoint of the diffusion model to fine-tune (pixel or latent space).
        reward: ``reward(images, prompts, attrs) -> (b,)``; None: :class:`ShapesReward`.
        prompts: ``prompts(n, rng) -> [(caption, attrs)]``; None: :class:`ShapesTrainingPrompts`.
        prompts_per_step: distinct prompts per training step.
        group_size: samples per prompt; the advantage compares them with each other.
        advantage: ``group`` (Flow-GRPO, per prompt) or ``batch`` (one mean and std for the batch).
        advantage_clip: advantages are clamped to ``[-advantage_clip, advantage_clip]`` (DDPO: 5).
        objective: ``ppo`` (the clipped importance-sampled surrogate) or ``reinforce`` (``-A log p``).
        clip_range: PPO's ratio clip (DDPO: 1e-4, its log-probabilities are per-element means).
        updates_per_step: optimizer steps on each sampled batch (more than one makes the ratio
            differ from 1 and the clip act).
        anchor_weight: weight of ``sum ||theta - theta_start||^2`` over the trained parameters.
        kl_weight: weight of the per-step KL to the reference policy, ``||mu - mu_ref||^2 / (2 sigma^2)``
            (averaged over elements, as the log-probabilities); it costs a reference forward per step.
        sample_steps: DDIM steps of the policy (and the default of ``generate``).
        eta: DDIM's noise scale; > 0, as the steps must be stochastic to have a log-probability.
        guidance_scale: classifier-free guidance of the policy; None: the checkpoint's default.
        train_text_encoder: also train a trainable text encoder (else it stays frozen).
        max_grad_norm: gradient-norm clip of every optimizer step; None: none.
        optimizer: optimizer factory for the trained parameters.
    """

    def __init__(
        self,
        init_from: str,
        reward: Reward | None = None,
        prompts: PromptSampler | None = None,
        prompts_per_step: int = 8,
        group_size: int = 4,
        advantage: Literal["group", "batch"] = "group",
        advantage_clip: float = 5.0,
        objective: Literal["ppo", "reinforce"] = "ppo",
        clip_range: float = 1e-4,
        updates_per_step: int = 1,
        anchor_weight: float = 0.0,
        kl_weight: float = 0.0,
        sample_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float | None = None,
        train_text_encoder: bool = False,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerCallable = _adamw,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["reward", "prompts"])
        if eta <= 0:
            raise ConfigError(
                "model.init_args.eta must be > 0: with eta = 0 DDIM's steps are deterministic and have no "
                "log-probability to optimise (DDPO uses eta = 1)"
            )
        if group_size < 2 and advantage == "group":
            raise ConfigError(
                "model.init_args.group_size must be at least 2 for group-relative advantages "
                "(a group of one has no spread); or set advantage: batch"
            )
        self.model = load_diffusion(init_from)
        model = self.model
        model.denoiser.load_state_dict(model.ema_denoiser.state_dict())
        if model.ema_text_encoder is not None:
            model.text_encoder.load_state_dict(model.ema_text_encoder.state_dict())
        elif train_text_encoder:
            raise ConfigError(
                "model.init_args.train_text_encoder: the checkpoint's text encoder is frozen (pretrained): "
                "leave train_text_encoder false"
            )
        model.text_encoder.requires_grad_(train_text_encoder)
        model.denoiser.requires_grad_(True)
        self.reward_fn = reward or ShapesReward()
        self.prompt_fn = prompts or ShapesTrainingPrompts()
        self.prompts_per_step, self.group_size = prompts_per_step, group_size
        self.advantage, self.advantage_clip = advantage, advantage_clip
        self.objective, self.clip_range, self.updates_per_step = objective, clip_range, updates_per_step
        self.anchor_weight, self.kl_weight = anchor_weight, kl_weight
        self.sample_steps, self.eta, self.max_grad_norm = sample_steps, eta, max_grad_norm
        self.guidance_scale = (
            model.sampling_defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        )
        self.train_text_encoder = train_text_encoder
        self.optimizer_factory = optimizer
        self.automatic_optimization = False

    def train(self, mode: bool = True):
        """The diffusion model stays in eval mode: the log-probability of a step must be the one it
        had when sampled (no dropout), and a frozen autoencoder never changes."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ the policy
    def trained_pairs(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(trained parameter, its frozen starting value) pairs: the policy against the reference."""
        m = self.model
        pairs = list(zip(m.denoiser.parameters(), m.ema_denoiser.parameters()))
        if self.train_text_encoder:
            pairs += list(zip(m.text_encoder.parameters(), m.ema_text_encoder.parameters()))
        return pairs

    def policy(self, prompts: list[str], reference: bool = False):
        """The ``(x_t, t) -> (x0, eps)`` of the policy (or of the frozen reference), guided."""
        d = self.model.sampling_defaults
        return self.model.denoise_fn(
            prompts, self.guidance_scale, d["dynamic_threshold"], reference, {}, d["clip_denoised"],
            d["guidance_rescale"],
        )  # fmt: skip

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> Trajectory:
        """DDIM trajectories of the current weights from the global RNG (each rank its own stream)."""
        denoise = self.policy(prompts)
        x = randn((len(prompts), *self.model.sample_shape), None, device=self.device)
        steps, states, log_probs = step_grid(self.model.schedule, self.sample_steps), [x], []
        for t, _, abar_t, abar_prev in steps:
            x0, eps = denoise(x, torch.full((len(prompts),), t, device=self.device, dtype=torch.long))
            mean, sigma = ddim_step(x0, eps, abar_t, abar_prev, self.eta)
            x = mean + sigma * torch.randn_like(mean) if sigma > 0 else mean
            log_probs.append(ddim_log_prob(x, mean, sigma) if sigma > 0 else None)
            states.append(x)
        return Trajectory(steps, states, log_probs)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Samples of the denoiser's space -> images (b, 3, h, w) in [-1, 1]."""
        if self.model.autoencoder is not None:
            x = self.model.from_latents(x)
        return x.clamp(-1, 1)

    def advantages(self, rewards: Tensor) -> Tensor:
        if self.advantage == "group":
            adv = group_advantages(rewards, self.group_size)
        else:
            adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        return adv.clamp(-self.advantage_clip, self.advantage_clip)

    def anchor(self) -> Tensor:
        """``sum ||theta - theta_start||^2`` over the trained parameters."""
        return sum((p - p0).pow(2).sum() for p, p0 in self.trained_pairs())

    def surrogate(self, log_prob: Tensor, old_log_prob: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
        """The policy loss of one step (to minimise) and the fraction of ratios outside the clip."""
        ratio = torch.exp(log_prob - old_log_prob)
        clipped = ((ratio - 1).abs() > self.clip_range).float().mean()
        if self.objective == "reinforce":
            return -(adv * log_prob).mean(), clipped
        unclipped_loss = -adv * ratio
        clipped_loss = -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        return torch.maximum(unclipped_loss, clipped_loss).mean(), clipped

    def policy_update(self, prompts: list[str], traj: Trajectory, adv: Tensor) -> dict[str, Tensor]:
        """One optimizer step over every stochastic step of ``traj``; returns what it measured."""
        opt = self.optimizers()
        opt.zero_grad()
        denoise = self.policy(prompts)
        reference = self.policy(prompts, reference=True) if self.kl_weight > 0 else None
        taken = [k for k, lp in enumerate(traj.log_probs) if lp is not None]
        clipped, kl = [], []
        for k in taken:
            t, _, abar_t, abar_prev = traj.steps[k]
            x_t, x_prev = traj.states[k], traj.states[k + 1]
            t_batch = torch.full((len(prompts),), t, device=self.device, dtype=torch.long)
            mean, sigma = ddim_step(*denoise(x_t, t_batch), abar_t, abar_prev, self.eta)
            loss, frac = self.surrogate(ddim_log_prob(x_prev, mean, sigma), traj.log_probs[k], adv)
            clipped.append(frac)
            if reference is not None:
                with torch.no_grad():
                    ref_mean, _ = ddim_step(*reference(x_t, t_batch), abar_t, abar_prev, self.eta)
                step_kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * sigma**2)
                kl.append(step_kl.mean().detach())
                loss = loss + self.kl_weight * step_kl.mean()
            self.manual_backward(loss / len(taken))
        anchor = self.anchor()
        if self.anchor_weight > 0:
            self.manual_backward(self.anchor_weight * anchor)
        if self.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        return {
            "clip_fraction": torch.stack(clipped).mean(),
            "anchor": anchor.detach(),
            "kl": torch.stack(kl).mean() if kl else torch.zeros((), device=self.device),
        }

    # ------------------------------------------------------------------ training
    def draw_prompts(self) -> tuple[list[str], list[dict]]:
        """``prompts_per_step`` prompts, each repeated ``group_size`` times (groups consecutive)."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))  # the rank's torch stream
        drawn = self.prompt_fn(self.prompts_per_step, rng)
        prompts = [c for c, _ in drawn for _ in range(self.group_size)]
        attrs = [a for _, a in drawn for _ in range(self.group_size)]
        return prompts, attrs

    def training_step(self, batch, batch_idx: int) -> None:
        self.model.eval()  # also after a validation, which restores every module's own earlier mode
        prompts, attrs = self.draw_prompts()
        traj = self.rollout(prompts)
        with torch.no_grad():
            rewards = self.reward_fn(self.decode(traj.states[-1]), prompts, attrs).float().to(self.device)
        adv = self.advantages(rewards)
        for _ in range(self.updates_per_step):
            stats = self.policy_update(prompts, traj, adv)
        b = len(prompts)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=b)
        self.log("train/advantage_std", adv.std(unbiased=False), batch_size=b)
        self.log("train/anchor", stats["anchor"], batch_size=b)
        self.log("train/kl", stats["kl"], batch_size=b)
        self.log("train/clip_fraction", stats["clip_fraction"], batch_size=b)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss``: the diffusion loss of the policy's weights on validation images (fixed
        noise per batch): how far fine-tuning has drifted from the data, not how good it is (the
        held-out scores of ``callbacks.ShapesScore`` say that)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            loss = self.model.loss(batch, cond_drop_prob=0.0)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        return self.optimizer_factory([p for p, _ in self.trained_pairs()])

    # ------------------------------------------------------------------ sampling
    def sampling_options(self) -> tuple[str, ...]:
        return self.model.sampling_options()

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int | list[int] | None = None, **sampling) -> Tensor:
        """(b, 3, h, w) in [-1, 1] from the fine-tuned weights, by default with the sampler they
        were fine-tuned for (DDIM with ``eta``, ``sample_steps``, ``guidance_scale``); ``sampling``
        overrides :meth:`TextToImageDiffusion.generate`'s options."""
        self.check_sampling(sampling)
        defaults = {"sampler": "ddim", "steps": self.sample_steps, "eta": self.eta,
                    "guidance_scale": self.guidance_scale, "use_ema": False}  # fmt: skip
        return self.model.generate(list(prompts), seed=seed, **{**defaults, **sampling})
