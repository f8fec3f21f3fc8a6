"""The memory planner: a meta-device trace counts what the CPU holds, its estimate is within 20% of
a measured peak, checkpointing and sharding lower it, and a run too large is told what fits."""

import os
import subprocess
import sys

import pytest
import torch

from networks.memory import LiveBytes, on_meta
from networks.text_encoders import TextEncoding
from networks.unet import UNet
from scripts import plan_memory as planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSION = ["--config", os.path.join(ROOT, "configs/diffusion/shapes32.yaml"), "--data.init_args.batch_size", "8"]


def _unet_step(device: str, checkpointing: bool) -> tuple[int, int]:
    """(peak, grads) bytes of one forward-backward of a small UNet with attention, as traced."""
    torch.manual_seed(0)
    with torch.device(device):
        net = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32,
                   heads=2, checkpointing=checkpointing).train()  # fmt: skip
        x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
        text = TextEncoding(torch.randn(4, 7, 32), torch.ones(4, 7, dtype=torch.bool), torch.randn(4, 32))
    with on_meta(), LiveBytes() as mem:
        net(x, t, text).square().mean().backward()
    return mem.peak, sum(p.grad.numel() * 4 for p in net.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_meta_trace_counts_exactly_what_the_cpu_holds(checkpointing):
    """The same step on meta tensors (no memory) and on the CPU: the same peak, to the byte. Without
    the fused-attention stand-in the meta device would count the full attention matrices."""
    meta, cpu = _unet_step("meta", checkpointing), _unet_step("cpu", checkpointing)
    assert meta == cpu


def test_checkpointing_lowers_the_traced_peak():
    assert _unet_step("meta", True)[0] < 0.6 * _unet_step("meta", False)[0]


def test_the_plan_counts_parameters_state_and_both_checkpointing_modes():
    plan = planner.plan(DIFFUSION)
    model, _, _ = planner.build(DIFFUSION, device="cpu")
    live = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ema_"))
    ema = sum(p.numel() for n, p in model.named_parameters() if n.startswith("ema_"))
    assert plan.trainable == live and plan.ema == ema > 0
    t = plan.traces[False]
    assert t.gradients == plan.trainable_bytes  # AdamW: two moments (and a step count) per parameter
    assert 2 * plan.trainable_bytes < t.optimizer_state < 2.001 * plan.trainable_bytes
    assert set(plan.traces) == {False, True} and plan.traces[True].activations < t.activations
    assert plan.fsdp(8, False) < plan.fsdp(2, False) < plan.ddp(False)


def test_a_manual_optimization_step_is_planned():
    """A GAN steps its discriminator and generator inside its training step: both optimizers'
    state is counted."""
    plan = planner.plan(["--config", os.path.join(ROOT, "configs/gan/stackgan1_shapes32.yaml"),
                         "--data.init_args.batch_size", "4"])  # fmt: skip
    t = plan.traces[False]
    assert 2 * t.gradients < t.optimizer_state < 2.001 * t.gradients and t.gradients > 0.99 * plan.trainable_bytes
    assert t.peak > t.gradients


def test_the_estimate_is_within_20_percent_of_the_measured_cpu_peak():
    """Measured in a fresh process: the rise of its peak resident memory over real training steps."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from scripts.plan_memory import measure; "
        "p, m = measure(sys.argv[2:]); print(p, m)"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    args = [*DIFFUSION[:2], "--data.init_args.batch_size", "32"]
    out = subprocess.run([sys.executable, "-c", code, ROOT, *args], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    planned, measured = (int(v) for v in out.stdout.split()[-2:])
    assert 0.8 <= planned / measured <= 1.2, (planned, measured)


def test_a_run_too_large_is_told_what_fits(capsys):
    plan = planner.plan(DIFFUSION)
    gib = plan.ddp(False) / planner.GIB
    text = planner.report(plan, gpus=8, gpu_memory=gib * 0.8, headroom=0.0)
    assert "DDP: " in text and "does not fit" in text and "to fit:" in text
    line = next(x for x in text.splitlines() if x.startswith("- a batch of"))
    batch = int(line.split()[4])
    smaller = planner.plan(DIFFUSION, batch_size=batch)
    assert 0 < batch < 8 and smaller.ddp(False) <= gib * 0.8 * planner.GIB
    roomy = planner.report(plan, gpus=8, gpu_memory=gib * 2, headroom=0.0)
    assert "does not fit" not in roomy and "to fit:" not in roomy


def test_bf16_mixed_halves_the_activations_and_not_the_weights():
    full, mixed = planner.plan(DIFFUSION), planner.plan(DIFFUSION, precision="bf16-mixed")
    assert mixed.weight_bytes == full.weight_bytes and mixed.traces[False].optimizer_state == full.traces[False].optimizer_state
    assert mixed.traces[False].activations == full.traces[False].activations // 2


def test_bad_input_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        planner.main(["--gpus", "8"])
    assert "--config" in capsys.readouterr().err
    prior = ["--config", os.path.join(ROOT, "configs/prior/maskgit_shapes.yaml"),
             "--model.init_args.autoencoder", str(tmp_path / "none.ckpt")]  # fmt: skip
    assert planner.main(prior) == 2
    err = capsys.readouterr().err
    assert "none.ckpt" in err and "--autoencoder_config" in err


def test_a_prior_is_planned_before_its_autoencoder_is_trained():
    prior = ["--config", os.path.join(ROOT, "configs/prior/maskgit_shapes.yaml"), "--data.init_args.batch_size", "4"]
    plan = planner.plan(prior, autoencoder_config=os.path.join(ROOT, "configs/autoencoder/vqgan_shapes.yaml"))
    assert plan.frozen > 0 and plan.trainable > 0  # the autoencoder frozen, the transformer and text encoder trained
    assert set(plan.traces) == {False, True}
