"""The text-conditional StyleGAN: its parts (demodulation, orthogonal regularisation, truncation)
and the generator trained by TextToImageGAN (truncation, per-prompt seeds, text cross-attention)."""

import pytest
import torch

from networks.stylegan import (
    MappingNetwork,
    ModulatedConv2d,
    StyleGenerator,
    mean_w,
    orthogonal_penalty,
    truncate,
)


@pytest.mark.parametrize("demodulate", [True, False])
def test_demodulation_keeps_unit_output_variance_for_unit_variance_input_whatever_the_style(demodulate):
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 32, 3, w_dim=16, demodulate=demodulate)
    torch.nn.init.normal_(conv.affine.weight, std=1.0)  # styles far from the identity
    x, w = torch.randn(4, 64, 24, 24), torch.randn(4, 16) * 3
    inner = conv(x, w)[:, :, 1:-1, 1:-1]  # away from the zero padding
    per_sample = inner.var(dim=(1, 2, 3))
    if demodulate:
        assert torch.allclose(per_sample, torch.ones(4), atol=0.06)
    else:  # the style's scale passes through: the variance is anything but 1
        assert (per_sample - 1).abs().max() > 1


def test_a_modulated_convolution_is_the_plain_convolution_with_the_style_scaled_weight():
    torch.manual_seed(1)
    conv = ModulatedConv2d(5, 7, 3, w_dim=4, demodulate=False)
    torch.nn.init.normal_(conv.affine.weight)
    x, w = torch.randn(3, 5, 8, 8), torch.randn(3, 4)
    style = conv.affine(w)
    expected = torch.stack(
        [torch.nn.functional.conv2d(x[i : i + 1], conv.weight * conv.scale * style[i][None, :, None, None], padding=1)[0]
         for i in range(3)]
    )  # fmt: skip
    assert torch.allclose(conv(x, w), expected, atol=1e-5)


def test_orthogonal_penalty_equals_its_closed_form_and_its_gradient_is_biggans_update():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]], requires_grad=True)
    # W W^T off the diagonal: (1*3 + 2*-1) = 1, (1*0 + 2*1) = 2, (3*0 + -1*1) = -1; each twice
    assert torch.isclose(orthogonal_penalty([w], strength=0.5), torch.tensor(0.5 / 2 * 2 * (1 + 4 + 1)))
    conv = torch.randn(6, 3, 3, 3, requires_grad=True)
    orthogonal_penalty([conv, torch.randn(6)], strength=1e-2).backward()  # a bias is skipped
    flat = conv.detach().reshape(6, -1)
    biggan = 2 * (flat @ flat.T * (1 - torch.eye(6))) @ flat  # BigGAN-PyTorch's ortho(): added to the grad
    assert torch.allclose(conv.grad.reshape(6, -1), 1e-2 * biggan, rtol=1e-4, atol=1e-6)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert orthogonal_penalty([q * 3]) < 1e-8  # orthogonal rows of any norm cost nothing
    with pytest.raises(ValueError, match="no matrix"):
        orthogonal_penalty([torch.randn(4)])


def test_truncation_at_zero_gives_the_prompts_mean_style_for_every_latent_and_at_one_keeps_w():
    torch.manual_seed(2)
    mapping = MappingNetwork(z_dim=8, text_dim=6, w_dim=10, layers=2)
    text = torch.randn(3, 6)
    centre = mean_w(mapping, text, samples=512, generator=torch.Generator().manual_seed(0))
    ws = [mapping(torch.randn(3, 8), text) for _ in range(4)]
    for w in ws:
        assert torch.allclose(truncate(w, centre, 0.0), centre) and torch.equal(truncate(w, centre, 1.0), w)
        half = truncate(w, centre, 0.5)
        assert torch.allclose((half - centre).norm(dim=1), 0.5 * (w - centre).norm(dim=1), atol=1e-6)
    assert not torch.allclose(centre[0], centre[1], atol=1e-3)  # one centre per prompt
    many = torch.stack([mapping(torch.randn(3, 8), text) for _ in range(2000)]).mean(0)
    assert torch.allclose(centre, many, atol=0.05)  # the mean of w over latents
    with pytest.raises(ValueError, match="psi"):
        truncate(ws[0], centre, 1.5)


def _gan(ortho_weight: float = 0.0, attention=(4, 8), hierarchical=True, live_noise=True):
    from lightning_modules.gan import TextToImageGAN
    from networks.stackgan import MatchingAwareDiscriminator
    from networks.text_encoders import TransformerTextEncoder

    torch.manual_seed(0)
    g = StyleGenerator(text_dim=16, image_size=16, z_dim=12, w_dim=16, channels=16, mapping_layers=1,
                       attention_resolutions=attention, heads=2, hierarchical=hierarchical)  # fmt: skip
    if live_noise:  # as after training: the noise, the latent chunks and the text attention all matter
        with torch.no_grad():
            for name, p in g.named_parameters():
                if "noise_strength" in name or name.endswith("gate") or "block_latent" in name:
                    p.normal_(0, 1.0)
    d = MatchingAwareDiscriminator(text_dim=16, image_size=16, channels=8, cond_dim=8, norm="none")
    text = TransformerTextEncoder(width=16, depth=1, heads=2, max_length=24, tokenizer="byte")
    gan = TextToImageGAN(g, [d], text, loss="hinge", ortho_weight=ortho_weight)
    gan.ema_generator.load_state_dict(g.state_dict())
    return gan.eval()


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def test_truncation_at_zero_gives_the_prompts_mean_image_for_every_seed():
    gan = _gan()
    free = gan.generate([PROMPTS[0]] * 3, seed=[1, 2, 3])
    assert (free[0] - free[1]).abs().max() > 1e-2 and (free[1] - free[2]).abs().max() > 1e-2
    mean = gan.generate([PROMPTS[0]] * 3, seed=[1, 2, 3], truncation=0.0)
    assert torch.allclose(mean[0], mean[1], atol=1e-5) and torch.allclose(mean[0], mean[2], atol=1e-5)
    other = gan.generate([PROMPTS[1]], seed=[1], truncation=0.0)
    assert (other[0] - mean[0]).abs().max() > 1e-2  # the mean image is the prompt's
    half = gan.generate([PROMPTS[0]] * 3, seed=[1, 2, 3], truncation=0.5)
    spread = lambda x: (x - x.mean(0)).square().mean()  # noqa: E731
    assert spread(mean) < spread(half) < spread(free)  # less diverse as psi falls


def test_generate_is_independent_of_the_batch_with_per_prompt_seeds():
    gan = _gan()
    batch = gan.generate(PROMPTS, seed=[5, 6, 7])
    alone = gan.generate(PROMPTS[1:2], seed=[6])
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert torch.equal(gan.generate(PROMPTS, seed=[5, 6, 7]), batch)  # a seed repeats the image


def test_the_image_attends_to_the_captions_tokens_and_a_closed_gate_is_the_identity():
    gan = _gan()
    g, encoding = gan.generator_net, gan.encode(PROMPTS[:2])
    z = torch.randn(2, g.z_dim)
    out = g(z, encoding.pooled, generator=torch.Generator().manual_seed(0), tokens=encoding.tokens, mask=encoding.mask)
    shuffled = g(z, encoding.pooled, generator=torch.Generator().manual_seed(0), tokens=encoding.tokens.flip(0), mask=encoding.mask.flip(0))
    assert (out.images[0] - shuffled.images[0]).abs().max() > 1e-3  # the tokens, not only the pooled vector, matter
    with torch.no_grad():
        for block in g.attention.values():
            block.gate.zero_()
    out = g(z, encoding.pooled, generator=torch.Generator().manual_seed(0), tokens=encoding.tokens, mask=encoding.mask)
    shuffled = g(z, encoding.pooled, generator=torch.Generator().manual_seed(0), tokens=encoding.tokens.flip(0), mask=encoding.mask.flip(0))
    assert torch.equal(out.images[0], shuffled.images[0])
    with pytest.raises(ValueError, match="tokens"):
        g(z, encoding.pooled)
    with pytest.raises(ValueError, match="attention_resolutions"):
        StyleGenerator(text_dim=16, image_size=16, attention_resolutions=(32,))


def test_the_generator_loss_adds_biggans_orthogonal_penalty_and_no_kl_term():
    plain, ortho = _gan(), _gan(ortho_weight=1e-3)
    encoding = plain.encode(PROMPTS)
    out = plain.run_generator(encoding.pooled, generator=torch.Generator().manual_seed(0), context=encoding)
    loss, logs = plain.g_loss(out, encoding.pooled)
    loss_ortho, logs_ortho = ortho.g_loss(out, encoding.pooled)
    expected = orthogonal_penalty(ortho.generator_net.ortho_weights(), 1e-3)
    assert expected < 1  # on the effective weights (the raw equalised-lr weights would cost thousands)
    assert torch.allclose(loss_ortho - loss, expected) and "kl" not in logs and torch.isclose(logs_ortho["ortho"], expected)


def test_truncation_on_a_generator_without_it_names_the_problem():
    from lightning_modules.gan import TextToImageGAN
    from networks.stackgan import MatchingAwareDiscriminator, StageIGenerator
    from networks.text_encoders import TransformerTextEncoder

    text = TransformerTextEncoder(width=16, depth=1, heads=2, max_length=24, tokenizer="byte")
    gan = TextToImageGAN(StageIGenerator(text_dim=16, image_size=16, z_dim=8, cond_dim=8, channels=32),
                         [MatchingAwareDiscriminator(text_dim=16, image_size=16, channels=8, cond_dim=8)], text)  # fmt: skip
    assert gan.generate(PROMPTS[:1], seed=0).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no truncation trick"):
        gan.generate(PROMPTS[:1], seed=0, truncation=0.5)


def test_the_mode_seeking_term_is_msgans_ratio_and_punishes_a_generator_that_ignores_z():
    from lightning_modules.gan import mode_seeking_loss

    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    za, zb = torch.zeros(2, 8), torch.full((2, 8), 2.0)
    assert torch.isclose(mode_seeking_loss(a, b, za, zb, eps=0.0), torch.tensor(2.0 / 0.5))  # 1 / (0.5 / 2)
    assert mode_seeking_loss(a, a + 1e-4, za, zb) > 1000  # the same image for two latents: collapse
    assert mode_seeking_loss(a, b + 0.5, za, zb) < mode_seeking_loss(a, b, za, zb)  # images further apart


def test_a_generator_step_with_mode_seeking_logs_it_and_trains_the_generator(tmp_path):
    import lightning as L

    gan = _gan()
    gan.mode_seeking_weight = 1.0
    gan.train()
    batch = {"caption": PROMPTS + PROMPTS[:1], "image": torch.rand(4, 3, 16, 16) * 2 - 1}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    g_before = [p.detach().clone() for p in gan.generator_net.parameters()]
    trainer.fit(gan, train_dataloaders=torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert "train/mode_seeking" in trainer.callback_metrics
    assert any(not torch.equal(a, p) for a, p in zip(g_before, gan.generator_net.parameters()))


def test_multi_scale_outputs_are_the_running_rgb_at_each_side_each_for_its_own_discriminator():
    torch.manual_seed(3)
    one = StyleGenerator(text_dim=16, image_size=16, z_dim=8, w_dim=16, channels=16, mapping_layers=1,
                         attention_resolutions=(), output_scales=1)  # fmt: skip
    two = StyleGenerator(text_dim=16, image_size=16, z_dim=8, w_dim=16, channels=16, mapping_layers=1,
                         attention_resolutions=(), output_scales=2)  # fmt: skip
    two.load_state_dict(one.state_dict())  # the same networks: only what is returned differs
    z, text = torch.randn(2, 8), torch.randn(2, 16)
    a = one(z, text, generator=torch.Generator().manual_seed(0)).images
    b = two(z, text, generator=torch.Generator().manual_seed(0)).images
    assert [x.shape[-1] for x in a] == [16] and [x.shape[-1] for x in b] == [8, 16]
    assert torch.allclose(a[0], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="output_scales must be in"):
        StyleGenerator(text_dim=16, image_size=16, attention_resolutions=(), output_scales=3)
    # with two scales, TextToImageGAN scores each against its discriminator and the real batch's downsampling
    from lightning_modules.gan import TextToImageGAN
    from networks.stackgan import MatchingAwareDiscriminator
    from networks.text_encoders import TransformerTextEncoder

    ds = [MatchingAwareDiscriminator(16, image_size=s, channels=8, cond_dim=8, norm="none") for s in (8, 16)]
    gan = TextToImageGAN(two, ds, TransformerTextEncoder(width=16, depth=1, heads=2, tokenizer="byte"), loss="hinge")
    sentence = gan.sentence(PROMPTS[:2])
    fakes = gan.run_generator(sentence).images
    loss, logs = gan.d_loss(gan.real_scales(torch.rand(2, 3, 16, 16), fakes), fakes, sentence)
    assert {"d_real_0", "d_real_1"} <= set(logs) and gan.generate(PROMPTS[:2], seed=0).shape == (2, 3, 16, 16)


def test_a_given_w_replaces_the_mapping_networks():
    gan = _gan(attention=())
    g = gan.generator_net
    with torch.no_grad():  # styles that depend on w, as after training (the affines start at 0)
        for name, p in g.named_parameters():
            if "affine.weight" in name:
                p.normal_(0, 0.5)
    z, text = torch.randn(2, 12), torch.randn(2, 16)
    w = g.mapping(z[:, : g.mapping.z_dim], text)
    rng = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.allclose(g(z, text, generator=rng(), w=w).images[-1], g(z, text, generator=rng()).images[-1], atol=1e-6)
    other = g(z, text, generator=rng(), w=w + 1).images[-1]
    assert (other - g(z, text, generator=rng()).images[-1]).abs().max() > 1e-3
