"""The autoencoder and CVAE configs through the real entry point: every config fits, the VQGAN
trains under 2-process DDP with one codebook, and settings that cannot work fail in one line."""

import glob
import os

import pytest
import torch
import torchvision
from PIL import Image
from test_cli import ROOT, run_cli


def _shapes_args(tmp_path):
    return ["--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
            "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"]  # fmt: skip


def _common(tmp_path):
    return ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]  # fmt: skip


@pytest.mark.parametrize("config", ["autoencoder/vqgan_shapes.yaml",
                                    pytest.param("autoencoder/vqvae_shapes.yaml", marks=pytest.mark.slow),
                                    pytest.param("autoencoder/kl_shapes.yaml", marks=pytest.mark.slow),
                                    pytest.param("vae/cvae_shapes.yaml", marks=pytest.mark.slow)])  # fmt: skip
def test_shapes_config_runs_fast_dev_run(config, tmp_path):
    args = ["fit", "--config", os.path.join(ROOT, "configs", config), "--trainer.fast_dev_run", "2",
            *_common(tmp_path), *_shapes_args(tmp_path)]  # fmt: skip
    if "autoencoder/" in config and "vqvae" not in config:
        args += ["--model.init_args.disc_start", "1"]  # the second step trains the discriminator too
    proc = run_cli(args, tmp_path)
    assert "max_steps=2` reached" in proc.stdout + proc.stderr
    pattern = "recon_*.png" if "autoencoder/" in config else "step_*.png"
    grids = glob.glob(str(tmp_path / "runs" / "*" / "samples" / pattern))
    assert grids, "a reconstruction grid (autoencoders) or a sample grid (the CVAE) at the validation"
    if "autoencoder/" in config:  # two images (batch 2), inputs above reconstructions, 64 px tiles
        assert Image.open(grids[0]).size == (2 * 64, 2 * 64 + 2)


@pytest.mark.slow
def test_gpu_vqgan_config_runs_on_a_cpu_with_a_local_perceptual_trunk(shapes16, tmp_path):
    torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()},
               tmp_path / "vgg16-397923af.pth")  # fmt: skip
    args = ["fit", "--config", os.path.join(ROOT, "configs", "autoencoder", "vqgan_shards_gpu.yaml"),
            "--trainer.fast_dev_run", "2", *_common(tmp_path),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true",
            "--data.init_args.train_shards", os.path.join(shapes16, "train"),
            "--data.init_args.val_shards", os.path.join(shapes16, "val"), "--data.init_args.val_samples", "4",
            "--data.init_args.image_size", "16", "--model.init_args.image_size", "16",
            "--model.init_args.encoder.init_args.channel_mult", "[1, 2]",
            "--model.init_args.decoder.init_args.channel_mult", "[1, 2]",
            "--model.init_args.encoder.init_args.channels", "32", "--model.init_args.decoder.init_args.channels", "32",
            "--model.init_args.quantizer.init_args.codebook_size", "64", "--model.init_args.discriminator.init_args.num_layers", "2",
            "--model.init_args.perceptual_path", str(tmp_path), "--model.init_args.disc_start", "1"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "max_steps=2` reached" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_vqgan_under_two_process_ddp_keeps_one_codebook(shapes16, tmp_path):
    """Two CPU processes (gloo), the GPU trainer's DDP strategy; the discriminator from the second
    step on and restarts forced by a high threshold: both ranks end with the same codebook,
    usage counts, decoder and discriminator."""
    runs = tmp_path / "runs"
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "autoencoder", "vqgan_shapes.yaml"),
             "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
             "--data.init_args.root", shapes16, "--data.init_args.resolution", "16", "--data.init_args.num_train", "600",
             "--data.init_args.num_val", "64", "--data.init_args.shard_size", "100",
             "--data.init_args.train_batches_per_epoch", "4", "--data.init_args.val_samples", "8",
             "--model.init_args.image_size", "16", "--model.init_args.disc_start", "1",
             "--model.init_args.quantizer.init_args.dead_code_threshold", "0.995",
             "--trainer.max_epochs", "1", "--trainer.max_time", "null", "--trainer.val_check_interval", "1.0",
             "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true",
             "--trainer.callbacks+=quantizer_dump.DumpQuantizer", "--run_name", "ddp"], tmp_path, timeout=400)  # fmt: skip
    ranks = [torch.load(runs / "ddp" / f"quantizer_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["restarted"] == ranks[1]["restarted"] > 0
    for key in ("codebook", "ema_count", "decoder"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for a, b in zip(ranks[0]["discriminator"], ranks[1]["discriminator"]):
        assert torch.equal(a, b)
    ckpt = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_steps"] == {"ae": 4, "d": 3} and ckpt["global_step"] == 7
    assert torch.equal(ckpt["state_dict"]["quantizer.codebook"], ranks[0]["codebook"])


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--model.init_args.quantizer.init_args.codebook_dim", "128", "codebook_dim 128 is larger than the latent dimension 64"),
    pytest.param("--model.init_args.image_size", "30", "image_size 30 is not a multiple of the downsampling factor 4",
                 marks=pytest.mark.slow),
    pytest.param("--model.init_args.perceptual_weight", "1.0", "model.init_args.perceptual_path", marks=pytest.mark.slow),
])  # fmt: skip
def test_settings_that_cannot_work_fail_in_one_line_before_any_work(option, value, says, tmp_path):
    args = ["fit", "--config", os.path.join(ROOT, "configs", "autoencoder", "vqgan_shapes.yaml"), option, value,
            *_shapes_args(tmp_path)]  # fmt: skip
    if "perceptual" in option:
        args += ["--model.init_args.perceptual_path", str(tmp_path / "no" / "vgg16.pth")]
    proc = run_cli(args, tmp_path, expect_failure=True)
    assert proc.returncode == 2 and says in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "shapes")


def test_data_and_model_image_sizes_must_agree(tmp_path):
    proc = run_cli(["fit", "--config", os.path.join(ROOT, "configs", "autoencoder", "kl_shapes.yaml"),
                    "--model.init_args.image_size", "16", *_shapes_args(tmp_path)], tmp_path, expect_failure=True)  # fmt: skip
    assert (
        proc.returncode == 2
        and "the data's image_size is 32 but KLAutoencoder makes or encodes 16 px images" in proc.stderr
    )
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_a_model_option_dropped_by_ckpt_path_is_named(tmp_path):
    """LightningCLI takes the model options from the checkpoint given with --ckpt_path: a resume
    of the same experiment warns about nothing, a changed option is named."""
    config = os.path.join(ROOT, "configs", "autoencoder", "vqvae_shapes.yaml")
    base = ["fit", "--config", config, *_common(tmp_path), *_shapes_args(tmp_path), "--trainer.max_time", "null"]
    run_cli([*base, "--trainer.max_steps", "2", "--run_name", "first"], tmp_path)
    last = str(tmp_path / "runs" / "first" / "checkpoints" / "last.ckpt")
    same = run_cli([*base, "--trainer.max_steps", "3", "--run_name", "first", "--ckpt_path", last], tmp_path)
    assert "warning: --ckpt_path" not in same.stderr
    changed = run_cli([*base, "--trainer.max_steps", "4", "--run_name", "first", "--ckpt_path", last,
                       "--model.init_args.rec_loss", "l1"], tmp_path)  # fmt: skip
    assert "warning: --ckpt_path: the checkpoint's model options replace" in changed.stderr
    assert "init_args.rec_loss 'l1' -> 'l2'" in changed.stderr
