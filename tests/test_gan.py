"""GANs: conditioning augmentation, step isolation, losses, conditioning, checkpoints, stage II."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.shapes import make_sample
from lightning_modules.gan import (
    StackGANStageII,
    TextToImageGAN,
    discriminator_loss,
    generator_loss,
    matching_aware_gradient_penalty,
)
from networks.errors import ConfigError
from networks.stackgan import (
    ConditioningAugmentation,
    MatchingAwareDiscriminator,
    ModulatedUpBlock,
    StageIGenerator,
    StageIIGenerator,
    TreeGenerator,
    UpBlock,
    colour_consistency,
)
from networks.text_encoders import TransformerTextEncoder

TEXT_DIM = 32


def _text_encoder():
    return TransformerTextEncoder(width=TEXT_DIM, depth=1, heads=2, max_length=16, tokenizer="byte")


def _stage1(size=16, d_norm="batch", **kw):
    g = StageIGenerator(TEXT_DIM, image_size=size, z_dim=16, cond_dim=16, channels=64)
    d = [MatchingAwareDiscriminator(TEXT_DIM, image_size=size, channels=16, cond_dim=16, norm=d_norm)]
    return TextToImageGAN(g, d, _text_encoder(), **kw)


def _trainer(steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, accelerator="cpu", **kw)  # fmt: skip


def _batches(n_batches, size=16, batch=8, seed=0):
    rng = __import__("numpy").random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        images, captions = [], []
        for _ in range(batch):
            img, caps, _ = make_sample(rng, size)
            images.append(
                torch.from_numpy(__import__("numpy").asarray(img)).permute(2, 0, 1).float() / 127.5 - 1
            )
            captions.append(caps[0])
        out.append({"image": torch.stack(images), "caption": captions})
    return DataLoader(out, batch_size=None)


# ----------------------------------------------------------------------------- conditioning augmentation


def test_conditioning_augmentation_kl_matches_the_analytic_divergence():
    mu, logvar = torch.randn(8, 16), torch.randn(8, 16)
    p = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    q = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(p, q).mean()
    assert torch.allclose(ConditioningAugmentation.kl(mu, logvar), expected, atol=1e-6)
    assert ConditioningAugmentation.kl(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0


def test_conditioning_augmentation_samples_its_gaussian_and_is_seeded():
    ca = ConditioningAugmentation(text_dim=6, cond_dim=4)
    sentence = torch.randn(1, 6).expand(20000, 6)
    c, mu, logvar = ca(sentence, torch.Generator().manual_seed(0))
    assert torch.allclose(c.mean(0), mu[0], atol=0.05)  # reparameterised samples have the predicted moments
    assert torch.allclose(c.std(0), (0.5 * logvar[0]).exp(), rtol=0.05)
    again, _, _ = ca(sentence, torch.Generator().manual_seed(0))
    other, _, _ = ca(sentence, torch.Generator().manual_seed(1))
    assert torch.equal(again, c) and not torch.equal(other, c)  # the seed fixes the codes
    c.sum().backward()  # the reparameterisation trick: gradients reach the mean/variance layer
    assert ca.fc.weight.grad is not None and ca.fc.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- networks and losses


def test_generators_make_their_scales():
    s = torch.randn(2, TEXT_DIM)
    out = StageIGenerator(TEXT_DIM, image_size=32, z_dim=8, channels=64)(torch.randn(2, 8), s)
    assert [x.shape[-1] for x in out.images] == [32] and out.mu.shape == (2, 128)
    tree = TreeGenerator(TEXT_DIM, base_size=8, num_stages=3, z_dim=8, channels=64)(torch.randn(2, 8), s)
    assert [x.shape[-1] for x in tree.images] == [8, 16, 32]
    assert all(x.abs().max() <= 1 for x in tree.images)
    refine = StageIIGenerator(TEXT_DIM, low_res_size=16, factor=4, channels=32)(torch.rand(2, 3, 16, 16), s)
    assert refine.images[0].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="power of two"):
        StageIGenerator(TEXT_DIM, image_size=24)


def test_modulated_block_starts_as_a_plain_block_and_lets_the_code_steer_its_features():
    torch.manual_seed(0)
    block, plain = ModulatedUpBlock(8, 4, cond_dim=6), UpBlock(8, 4)
    plain[1].weight.data.copy_(block.conv[1].weight)
    x, c = torch.randn(5, 8, 4, 4), torch.randn(5, 6)
    assert torch.allclose(block(x, c), plain(x), atol=1e-6)  # zero-initialised affine
    block.affine.weight.data.normal_()
    same_x = x[:1].expand(2, -1, -1, -1)
    out = block(same_x, torch.randn(2, 6))
    assert out.shape == (2, 4, 8, 8) and not torch.allclose(out[0], out[1])  # the code alone changes them
    g = StageIGenerator(TEXT_DIM, image_size=16, z_dim=8, channels=64, modulated=True)
    g(torch.randn(4, 8), torch.randn(4, TEXT_DIM)).images[0].sum().backward()
    # every resolution learns from the text
    assert all(up.affine.weight.grad.abs().sum() > 0 for up in g.stem.ups)


def test_losses_reward_a_discriminator_that_tells_matching_pairs_apart():
    good, bad = torch.full((4,), 6.0), torch.full((4,), -6.0)
    for kind in ("bce", "hinge"):
        right = discriminator_loss(good, bad, bad, kind)
        wrong = discriminator_loss(bad, good, good, kind)
        assert right < 0.01 and wrong > 3
        assert generator_loss(good, kind) < generator_loss(bad, kind)


def test_matching_aware_gradient_penalty_is_the_gradient_norm_to_the_power():
    class Linear(torch.nn.Module):  # D(x, s) = sum(x) + 2 sum(s): gradient norm sqrt(n_x + 4 n_s)
        def forward(self, image, sentence):
            return image.flatten(1).sum(1) + 2 * sentence.sum(1), None

    gp = matching_aware_gradient_penalty(Linear(), torch.randn(3, 3, 4, 4), torch.randn(3, 5), power=6)
    assert gp.item() == pytest.approx(math.sqrt(48 + 4 * 5) ** 6, rel=1e-5)


def test_colour_consistency_is_zero_across_scales_of_one_image_and_grows_with_a_colour_shift():
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    high = torch.nn.functional.interpolate(
        low, scale_factor=2, mode="nearest"
    )  # same colours, twice the side
    assert colour_consistency(low, high) < 1e-10
    shifted = (high + torch.tensor([0.5, 0.0, -0.5])[:, None, None]).clamp(-1, 1)
    assert colour_consistency(low, shifted) > 0.1


# ----------------------------------------------------------------------------- training


class Recording(TextToImageGAN):
    """Records which parameters each optimizer step changed."""

    def step_optimizer(self, which, loss):
        before = {n: p.detach().clone() for n, p in self.named_parameters()}
        stepped = super().step_optimizer(which, loss)
        changed = {n for n, p in self.named_parameters() if not torch.equal(p, before[n])}
        self.changed.setdefault(which, set()).update(changed)
        return stepped


def _names(module, prefix):
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


def test_generator_step_changes_only_the_generator_and_discriminator_step_only_the_discriminator():
    L.seed_everything(0)
    g = StageIGenerator(TEXT_DIM, image_size=16, z_dim=16, cond_dim=16, channels=64)
    d = [MatchingAwareDiscriminator(TEXT_DIM, image_size=16, channels=16, cond_dim=16)]
    model = Recording(g, d, _text_encoder(), ma_gp_weight=2.0, g_clip_norm=1.0, d_clip_norm=1.0)
    model.changed = {}
    ema_before = [p.clone() for p in model.ema_generator.parameters()]
    _trainer(4).fit(model, _batches(2))
    generator, discriminator = (
        _names(model.generator_net, "generator_net"),
        _names(model.discriminators, "discriminators"),
    )
    text = _names(model.text_encoder, "text_encoder")
    assert model.changed["g"] and model.changed["g"] <= generator
    assert model.changed["d"] and model.changed["d"] <= discriminator | text
    assert model.changed["d"] & text  # a trainable text encoder learns from the matching-aware loss
    assert model.steps == {"g": 2, "d": 2} and model.global_step == 4  # Lightning counts both optimizers
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, model.ema_generator.parameters()))


class StepRecorder(L.pytorch.loggers.Logger):
    name, version = "steps", 0
    steps: list

    def log_metrics(self, metrics, step=None):
        self.steps.append(step)

    def log_hyperparams(self, *args, **kwargs):
        pass


def test_discriminator_steps_per_generator_step_and_what_each_counter_counts():
    model = _stage1(d_steps_per_g_step=3)
    logger = StepRecorder()
    logger.steps = []
    trainer = L.Trainer(max_steps=8, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, _batches(6))
    assert model.steps == {"g": 2, "d": 6} and model.global_step == 8  # optimizer steps
    assert max(logger.steps) == 5  # the logged x-axis counts batches (0..5), not optimizer steps


def test_schedulers_step_with_their_optimizer():
    model = _stage1(
        d_steps_per_g_step=2,
        g_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        d_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1),
    )
    _trainer(6).fit(model, _batches(4))
    g_opt, d_opt = model.optimizers()
    assert g_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.5**2)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.1**4)


@pytest.mark.parametrize("modulated", [pytest.param(False, marks=pytest.mark.slow), True])  # the 32 px config (the table): modulated
def test_overfit_each_caption_generates_its_own_image(modulated):
    """Four caption -> image pairs; after training, each caption's sample is nearest its own image."""
    L.seed_everything(0)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    colours = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, -1]])
    targets = -torch.ones(4, 3, 16, 16)
    targets[:, :, 4:12, 4:12] = colours[:, :, None, None]  # a coloured block on black, one colour per caption
    batch = {"image": targets.repeat(4, 1, 1, 1), "caption": captions * 4}
    g = StageIGenerator(TEXT_DIM, image_size=16, z_dim=16, cond_dim=16, channels=64, modulated=modulated)
    d = [MatchingAwareDiscriminator(TEXT_DIM, image_size=16, channels=16, cond_dim=16, norm="none")]
    model = TextToImageGAN(g, d, _text_encoder(), loss="bce", ma_gp_weight=2.0, ema_decay=0.9)
    _trainer(1600).fit(model, DataLoader([batch] * 800, batch_size=None))
    model.eval()
    images = model.generate(captions, seed=0)
    distances = torch.cdist(images.flatten(1), targets.flatten(1))
    assert torch.equal(distances.argmin(1), torch.arange(4)), distances


def test_checkpoint_round_trip_keeps_generator_ema_and_step_counts(tmp_path):
    model = _stage1()
    trainer = _trainer(4)
    trainer.fit(model, _batches(2))
    path = str(tmp_path / "gan.ckpt")
    trainer.save_checkpoint(path)
    loaded = TextToImageGAN.load_from_checkpoint(path, weights_only=False)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    model.eval(), loaded.eval()
    assert torch.equal(model.generate(["a red circle"], seed=3), loaded.generate(["a red circle"], seed=3))
    assert not torch.equal(model.generate(["a red circle"], seed=3), model.generate(["a red circle"], seed=4))
    resumed = _stage1()
    _trainer(8).fit(resumed, _batches(4), ckpt_path=path, weights_only=False)
    assert resumed.steps == {"g": 4, "d": 4} and resumed.global_step == 8


def test_stage_two_refines_a_frozen_stage_one(tmp_path):
    stage1 = _stage1(size=8)
    trainer = _trainer(2)
    trainer.fit(stage1, _batches(1, size=8))
    path = str(tmp_path / "stage1.ckpt")
    trainer.save_checkpoint(path)
    g = StageIIGenerator(TEXT_DIM, low_res_size=8, factor=2, cond_dim=16, channels=32, num_res_blocks=1)
    d = [MatchingAwareDiscriminator(TEXT_DIM, image_size=16, channels=16, cond_dim=16)]
    stage2 = StackGANStageII(path, g, d, loss="hinge")
    frozen = {k: v.clone() for k, v in stage2.stage1_generator.state_dict().items()}
    text = {k: v.clone() for k, v in stage2.text_encoder.state_dict().items()}
    _trainer(4).fit(stage2, _batches(2, size=16))
    assert all(torch.equal(v, stage2.stage1_generator.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, stage2.text_encoder.state_dict()[k]) for k, v in text.items())
    stage2.eval()
    low, high = stage2.generate(["a red circle", "two blue squares"], seed=0, all_scales=True)
    assert low.shape == (2, 3, 8, 8) and high.shape == (2, 3, 16, 16)
    stage1.eval()  # stage II starts from stage I's EMA generator with the same seed
    assert torch.allclose(low, stage1.generate(["a red circle", "two blue squares"], seed=0), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="stage1_checkpoint"):
        StackGANStageII(str(tmp_path / "missing.ckpt"), g, d)
    with pytest.raises(ValueError, match="low_res_size"):
        StackGANStageII(path, StageIIGenerator(TEXT_DIM, low_res_size=16), d)


def test_mismatched_text_dimension_is_a_clear_error():
    g = StageIGenerator(64, image_size=16)
    with pytest.raises(ValueError, match="text_dim to 32"):
        TextToImageGAN(g, [MatchingAwareDiscriminator(64, image_size=16)], _text_encoder())


def test_generator_ema_moves_at_generator_steps_and_text_ema_at_discriminator_steps(monkeypatch):
    import lightning_modules.gan as gan

    updates = []
    real = gan.ema_update
    monkeypatch.setattr(
        gan, "ema_update", lambda ema, live, decay: (updates.append((ema, decay)), real(ema, live, decay))
    )
    model = _stage1(d_steps_per_g_step=2)
    text_before = [p.clone() for p in model.ema_text_encoder.parameters()]
    _trainer(6).fit(model, _batches(4))  # 4 batches: 4 discriminator steps, 2 generator steps
    assert model.steps == {"g": 2, "d": 4}
    generator_updates = [d for ema, d in updates if ema is model.ema_generator]
    text_updates = [d for ema, d in updates if ema is model.ema_text_encoder]
    assert len(generator_updates) == 2 and len(text_updates) == 4
    assert generator_updates[0] == pytest.approx(2 / 11)  # warm-up counted in generator steps (1, 2)
    assert any(not torch.equal(a, b) for a, b in zip(text_before, model.ema_text_encoder.parameters()))


def test_generate_pairs_the_ema_generator_with_the_ema_text_encoder():
    model = _stage1()
    _trainer(4).fit(model, _batches(2))
    model.eval()
    captions = ["a red circle", "two blue squares"]
    ema_sentence = model.ema_text_encoder(captions).pooled
    assert not torch.allclose(ema_sentence, model.text_encoder(captions).pooled)
    expected = model.run_generator(ema_sentence, ema=True, generator=model.generator(5, model.device)).images[
        -1
    ]
    assert torch.equal(model.generate(captions, seed=5), expected.clamp(-1, 1))
    frozen = TextToImageGAN(
        StageIGenerator(TEXT_DIM, image_size=16, z_dim=16, cond_dim=16, channels=64),
        [MatchingAwareDiscriminator(TEXT_DIM, image_size=16, channels=16, cond_dim=16)],
        _text_encoder().requires_grad_(False),
    )
    assert frozen.ema_text_encoder is None  # nothing to average


def test_gan_images_depend_only_on_their_own_prompt_and_seed():
    model = _stage1().eval()
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    together = model.generate(prompts, seed=[4, 5, 6])
    alone = torch.cat([model.generate([p], seed=[s]) for p, s in zip(prompts, [4, 5, 6])])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], model.generate(prompts[:1], seed=[7])[0])


def test_gan_rejects_unknown_sampling_options_by_naming_its_own(tmp_path):
    model = _stage1()
    with pytest.raises(
        TypeError,
        match=r"TextToImageGAN.generate does not take 'steps'; its options are: use_ema, all_scales",
    ):
        model.generate(["a"], steps=20)
    from callbacks import SampleGrid, ShapesScore

    for callback in (
        SampleGrid(["a"], sampling={"guidance_scale": 3.0}),
        ShapesScore(sampling={"steps": 20}),
    ):
        with pytest.raises(TypeError, match="its options are: use_ema, all_scales"):
            callback.setup(None, model, "fit")  # before any training


# ----------------------------------------------------------------------------- manual optimization


class GradientRecording(TextToImageGAN):
    """Records, per pass, each network's own gradient of its loss and what the other network's
    gradients were before and after the pass; and, at each optimizer step, the gradient it used."""

    def step_optimizer(self, which, loss):
        own = [p for p in self.optimizer_parameters()[which] if p.requires_grad]
        other = self.optimizer_parameters()["d" if which == "g" else "g"]
        grads = torch.autograd.grad(loss, own, retain_graph=True, allow_unused=True)  # an unused token embedding: None
        self.log_passes.append((which, [torch.zeros_like(p) if g is None else g.clone() for g, p in zip(grads, own)]))
        before = [None if p.grad is None else p.grad.clone() for p in other]
        opt = self.optimizer(which)
        original_step = opt.step

        def step(*args, **kwargs):  # the gradient the optimizer steps with
            self.log_steps.append((which, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in own]))
            return original_step(*args, **kwargs)

        opt.step = step
        try:
            stepped = super().step_optimizer(which, loss)
        finally:
            opt.step = original_step
        after = [None if p.grad is None else p.grad.clone() for p in other]
        self.other_untouched.append(all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                                        for a, b in zip(before, after)))  # fmt: skip
        return stepped


def _recording(**kw):
    torch.manual_seed(0)
    g = StageIGenerator(TEXT_DIM, image_size=16, z_dim=16, cond_dim=16, channels=32)
    d = [MatchingAwareDiscriminator(TEXT_DIM, image_size=16, channels=16, cond_dim=16, norm="none")]
    model = GradientRecording(g, d, _text_encoder(), **kw)
    model.log_passes, model.log_steps, model.other_untouched = [], [], []
    return model


@pytest.mark.parametrize("accumulate", [1, 3])
def test_under_accumulation_each_optimizer_steps_once_per_window_with_the_mean_gradient(accumulate):
    model = _recording(accumulate=accumulate, r1_weight=1.0)
    _trainer(4).fit(model, _batches(4 * accumulate // 2, batch=4))  # 2 steps each = 2 windows of batches
    assert model.steps == {"g": 2, "d": 2} and model.global_step == 4
    for which in ("d", "g"):
        passes = [grads for w, grads in model.log_passes if w == which]
        steps = [grads for w, grads in model.log_steps if w == which]
        assert len(passes) == 2 * accumulate and len(steps) == 2
        for k, used in enumerate(steps):  # the step's gradient is the mean over its window's passes
            window = passes[k * accumulate : (k + 1) * accumulate]
            for i, grad in enumerate(used):
                expected = sum(p[i] for p in window) / accumulate
                assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7), (which, k, i)


def test_the_discriminator_gets_no_gradient_in_the_generators_step_nor_the_generator_in_its():
    model = _recording(accumulate=2, mode_seeking_weight=1.0, r1_weight=1.0)
    _trainer(4).fit(model, _batches(4, batch=4))
    assert len(model.other_untouched) == 8 and all(model.other_untouched)


def test_accumulation_below_one_and_lightnings_own_are_refused():
    with pytest.raises(ValueError, match="accumulate must be at least 1"):
        _stage1(accumulate=0)
    with pytest.raises(Exception, match="accumulat"):  # Lightning's own does not apply to manual optimization
        _trainer(2, accumulate_grad_batches=2).fit(_stage1(), _batches(2))


def test_r1_is_the_squared_input_gradient_and_runs_lazily_every_interval():
    from lightning_modules.gan import r1_gradient_penalty

    class Linear(torch.nn.Module):  # D(x, s) = <a, x> + <b, s>: grad_x = a
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(3, 4, 4))
            self.b = torch.nn.Parameter(torch.randn(5))

        def forward(self, image, sentence):
            return (image * self.a).flatten(1).sum(1) + sentence @ self.b, None

    d = Linear()
    r1 = r1_gradient_penalty(d, torch.randn(6, 3, 4, 4), torch.randn(6, 5))
    assert torch.isclose(r1, d.a.detach().square().sum())  # the sentence's gradient is not in it (MA-GP's is)
    r1.backward()
    assert torch.allclose(d.a.grad, 2 * d.a.detach())  # it trains the discriminator (create_graph)
    model = _stage1(r1_weight=1.0, r1_interval=3, d_norm="none")
    assert [s for s in range(1, 10) if model.regularise_at(s)] == [1, 4, 7]
    with pytest.raises(ConfigError, match="batch-norm discriminator"):
        _stage1(r1_weight=1.0)
    assert not any(_stage1().regularise_at(s) for s in range(1, 5))  # r1_weight 0: never


def test_the_r1_term_weighs_gamma_over_two_times_the_interval_and_is_logged():
    model = _stage1(r1_weight=0.5, r1_interval=4, d_norm="none")
    captions = ["a red circle", "a blue square"]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    sentence = model.sentence(captions)
    fakes = model.run_generator(sentence).images
    torch.manual_seed(0)
    plain, _ = model.d_loss([images], fakes, sentence)
    torch.manual_seed(0)
    regularised, logs = model.d_loss([images], fakes, sentence, regularise=True)
    assert torch.isclose(regularised - plain, 0.5 / 2 * 4 * logs["r1_0"], rtol=1e-4)


def test_ddp_ranks_take_the_r1_penalty_at_the_same_steps(tmp_path):
    import json
    import os
    import sys

    from conftest import run_processes

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")]), "OMP_NUM_THREADS": "1"}
    proc = run_processes([sys.executable, os.path.join(root, "tests", "ddp_gan_r1_script.py"), str(out)],
                         timeout=150, retries=1, cwd=str(tmp_path), env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    assert ranks[0]["r1_steps"] == ranks[1]["r1_steps"] == [1, 3, 5]  # interval 2 over 6 D steps
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank saw its own data
    assert ranks[0]["d_checksum"] == pytest.approx(ranks[1]["d_checksum"], rel=1e-6)  # gradients synced


# ----------------------------------------------------------------------------- the generator's CLIP loss


def test_the_generators_clip_loss_is_the_spherical_distance_under_a_frozen_clip_kept_out_of_checkpoints(tiny_methods):
    from lightning_modules.clip_guided import spherical_distance

    with pytest.raises(ConfigError, match="clip and clip_weight go together"):
        _stage1(clip_weight=1.0)
    with pytest.raises(ConfigError, match="clip and clip_weight go together"):
        _stage1(clip=tiny_methods["clip"])  # a CLIP that nothing would use
    model = _stage1(clip=tiny_methods["clip"], clip_weight=2.0)
    captions = ["a red block", "a blue block"]
    out = model.run_generator(model.sentence(captions))
    with_clip, logs = model.g_loss(out, model.sentence(captions).detach(), captions)
    grads = torch.autograd.grad(model.clip_loss(out.images[-1], captions), list(model.generator_net.parameters()),
                                retain_graph=True, allow_unused=True)  # fmt: skip
    assert sum(g.abs().sum() for g in grads if g is not None) > 0  # it trains the generator through the image
    model.clip_weight = 0.0
    without, _ = model.g_loss(out, model.sentence(captions).detach(), captions)
    with torch.no_grad():
        expected = spherical_distance(model.clip.encode_image(out.images[-1]), model.clip.encode_text(captions)).mean()
    assert torch.isclose(logs["clip"], expected, rtol=1e-5)
    assert torch.isclose(with_clip - without, 2.0 * expected, rtol=1e-4)
    model.clip_weight = 2.0
    clip_before = [p.clone() for p in model.clip.parameters()]
    _trainer(2).fit(model, _batches(1))
    assert all(torch.equal(a, b) for a, b in zip(clip_before, model.clip.parameters()))  # frozen
    assert not model.optimizer_parameters()["g"] or all(
        p is not q for p in model.optimizer_parameters()["g"] for q in model.clip.parameters()
    )
    assert not any(k.startswith("clip.") for k in model.state_dict())  # it comes from its own checkpoint
