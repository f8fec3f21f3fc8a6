"""The text-conditional StyleGAN's parts: demodulation, orthogonal regularisation, truncation."""

import pytest
import torch

from networks.stylegan import MappingNetwork, ModulatedConv2d, mean_w, orthogonal_penalty, truncate


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
