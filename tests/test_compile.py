"""torch.compile through the CompileNetworks callback: the same outputs, the same checkpoint keys."""

import pytest
import torch
from lightning.pytorch import LightningModule

from callbacks import CompileNetworks


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.net(x))


def _compiled(backend):
    torch.manual_seed(0)
    model, eager = Tiny(), Tiny()
    eager.load_state_dict(model.state_dict())
    callback = CompileNetworks(backend=backend)
    callback.setup(None, model, "fit")
    return model, eager, callback


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_networks_match_eager_and_keep_their_checkpoint_keys(backend, tmp_path):
    model, eager, callback = _compiled(backend)
    assert callback.compiled == ["net"]  # the frozen layer has no trainable parameters
    x = torch.randn(5, 8)
    assert torch.allclose(model(x), eager(x), atol=1e-5)
    out = model(x).square().mean()
    out.backward()  # training through the compiled graph
    assert model.net[0].weight.grad is not None
    assert list(model.state_dict()) == list(eager.state_dict())  # no _orig_mod prefix
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = Tiny()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))  # loads into an eager model
    assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_an_unknown_network_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has no network \['nett'\] \(did you mean 'net'\?\)"):
        CompileNetworks(modules=["nett"]).setup(None, Tiny(), "fit")
