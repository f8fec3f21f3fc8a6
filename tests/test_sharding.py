"""Fully sharded training (FSDP2 through ``FullyShardedStrategy``) on two CPU processes (gloo),
against one process on the whole batch: losses, weights and the EMA agree; each rank keeps half the
EMA; full and sharded checkpoints load in one process and resume."""

import json
import os
import sys

import pytest
import torch
from conftest import run_processes
from torch import nn

from lightning_modules.sharding import FullyShardedStrategy, blocks, shard_module, sharded_networks
from networks.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "fsdp_script.py")


def _run(out, mode, steps, *extra):
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1"}
    proc = run_processes([sys.executable, SCRIPT, str(out), mode, str(steps), *extra], timeout=240, retries=1,
                         cwd=str(out), env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = 2 if mode == "fsdp" else 1
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(ranks)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return {"fsdp": _run(tmp / "fsdp", "fsdp", 3), "single": _run(tmp / "single", "single", 3), "tmp": tmp}


def test_two_sharded_processes_train_as_one_process_on_the_whole_batch(runs):
    (rank0, rank1), (single,) = runs["fsdp"], runs["single"]
    # each rank's loss is on its half; their mean is the whole batch's loss, step by step
    for a, b, whole in zip(rank0["losses"], rank1["losses"], single["losses"]):
        assert (a + b) / 2 == pytest.approx(whole, rel=1e-5)
    assert rank0["losses"] != rank1["losses"]
    assert _max_diff(rank0["state"], single["state"]) < 1e-5  # updated weights and the EMA
    assert torch.allclose(torch.tensor(rank0["outputs"]), torch.tensor(single["outputs"]), atol=1e-5)


def test_each_rank_keeps_the_ema_of_its_own_shard_and_frozen_parts_stay_whole(runs):
    (rank0, rank1), _ = runs["fsdp"], runs["single"]
    assert rank0["local_ema"] + rank1["local_ema"] == rank0["total_ema"]
    assert rank0["local_ema"] < 0.6 * rank0["total_ema"]  # no full EMA copy on any rank
    assert rank0["frozen_whole"] and rank1["frozen_whole"]
    assert rank0["units"] == 3 + 1  # each of the three blocks gathered on its own, then the rest


def test_a_full_checkpoint_of_a_sharded_run_loads_in_one_process(runs):
    from fsdp_script import Regression

    checkpoint = torch.load(runs["tmp"] / "fsdp" / "full.ckpt", map_location="cpu", weights_only=False)
    model = Regression()
    model.load_state_dict(checkpoint["state_dict"])  # plain tensors, the same names
    single = runs["single"][0]["state"]
    assert _max_diff({k: v.tolist() for k, v in model.state_dict().items()}, single) < 1e-5
    with torch.no_grad():
        out = model.ema_net(torch.linspace(-1, 1, 12).reshape(2, 6))
    assert torch.allclose(out, torch.tensor(runs["fsdp"][0]["outputs"]), atol=1e-6)  # the same samples


@pytest.mark.slow
def test_sharded_and_full_checkpoints_resume_where_a_continuous_run_would_be(tmp_path):
    """Two sharded steps saved as shards; the folder consolidated to one file; then two more steps
    from each (sharded from the folder, one process from the file) equal four continuous steps."""
    from scripts.consolidate_checkpoint import consolidate

    _run(tmp_path / "first", "fsdp", 2, "--sharded_checkpoint")
    folder = tmp_path / "first" / "sharded.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2
    consolidate(str(folder), str(tmp_path / "full.ckpt"))
    (whole,) = _run(tmp_path / "whole", "single", 4)
    (sharded, _) = _run(tmp_path / "again", "fsdp", 4, "--resume", str(folder), "--sharded_checkpoint")
    (single,) = _run(tmp_path / "file", "single", 4, "--resume", str(tmp_path / "full.ckpt"))
    assert _max_diff(sharded["state"], whole["state"]) < 1e-5
    assert _max_diff(single["state"], whole["state"]) < 1e-5
    assert single["losses"] == pytest.approx(whole["losses"][2:], rel=1e-5)


def test_blocks_and_networks_to_shard():
    from lightning_modules.diffusion import TextToImageDiffusion
    from networks.text_encoders import TransformerTextEncoder
    from networks.unet import UNet

    unet = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32, heads=2)
    model = TextToImageDiffusion(unet, TransformerTextEncoder(width=32, depth=2, heads=2, max_length=8, tokenizer="byte"))
    assert sharded_networks(model) == ["denoiser", "text_encoder", "ema_denoiser", "ema_text_encoder"]
    found = blocks(model.denoiser)
    assert found and not any(isinstance(b, nn.ModuleList) for b in found)
    assert len(blocks(model.text_encoder)) == 2  # its transformer blocks
    assert FullyShardedStrategy()._save_distributed_checkpoint is False  # full checkpoints by default


def test_manual_optimisation_is_refused_with_the_strategy_that_works():
    from lightning_modules.base import BaseModule

    class TwoOptimizers(BaseModule):  # as the GANs and VQGAN step theirs
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.generator, self.discriminator = nn.Linear(2, 2), nn.Linear(2, 1)

    with pytest.raises(ConfigError, match="DDP"):
        shard_module(TwoOptimizers(), mesh=None)


def test_a_consolidation_of_a_file_says_it_needs_none(tmp_path):
    from scripts.consolidate_checkpoint import main

    (tmp_path / "x.ckpt").write_bytes(b"")
    assert main([str(tmp_path / "x.ckpt"), str(tmp_path / "y.ckpt")]) == 2


@pytest.mark.slow
def test_the_main_job_trains_sharded_with_its_callbacks_and_its_checkpoint_generates_in_one_process(tmp_path):
    """``train.py fit`` of the diffusion config on two sharded processes: the held-out score and
    the sample grid run on every rank (no hang), and ``last.ckpt`` is a full file that
    ``load_method`` loads in one process and samples from."""
    from lightning_modules.base import load_method

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", os.path.join(ROOT, "configs/diffusion/shapes.yaml"),
           "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.num_train", "300",
           "--data.init_args.num_val", "32", "--data.init_args.shard_size", "50", "--data.init_args.batch_size", "8",
           "--data.init_args.num_workers", "0", "--trainer.strategy",
           '{"class_path": "lightning_modules.sharding.FullyShardedStrategy"}', "--trainer.devices", "2",
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.default_root_dir",
           str(tmp_path / "runs"), "--run_name", "sharded", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = run_processes(cmd, timeout=400, retries=1, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "sharded"
    assert "val/shapes_all_correct" in proc.stdout + proc.stderr
    assert len(list((run / "samples").glob("step_*.png"))) >= 2
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    images = load_method(str(last), option="checkpoint").generate(["a red circle", "a blue square"], seed=0, steps=3)
    assert images.shape == (2, 3, 16, 16) and not torch.allclose(images[0], images[1])
