"""The token-prior and latent-diffusion configs through the real entry point, on tiny 32 px
autoencoder checkpoints made here: every config fits, a prior predicts from its checkpoint plus
the autoencoder path, and an autoencoder that cannot work fails in one line before any work."""

import glob
import os

import pytest
import torch
from conftest import fit_and_save
from test_cli import ROOT, run_cli
from torch.utils.data import DataLoader

from lightning_modules.autoencoder import KLAutoencoder, VQAutoencoder
from networks.autoencoder import Decoder, Encoder
from networks.quantizer import VectorQuantizer


@pytest.fixture(scope="module")
def autoencoders32(tmp_path_factory):
    """A VQ autoencoder with the shapes configs' code grid (K = 512, 8 x 8 codes of 32 px images)
    and a KL autoencoder with their latent (4 x 8 x 8), both narrow and trained one step."""
    root = tmp_path_factory.mktemp("ae32")
    loader = DataLoader([{"image": torch.rand(2, 3, 32, 32) * 2 - 1, "caption": ["", ""]}], batch_size=None)
    paths = {}
    for kind in ("vq", "kl"):
        torch.manual_seed(0)
        enc = Encoder(channels=8, channel_mult=(1, 1, 1), num_res_blocks=1, out_channels=8)
        dec = Decoder(
            in_channels=8 if kind == "vq" else 4, channels=8, channel_mult=(1, 1, 1), num_res_blocks=1
        )
        if kind == "vq":
            model = VQAutoencoder(enc, dec, VectorQuantizer(512, dim=8), image_size=32)
        else:
            model = KLAutoencoder(enc, dec, latent_channels=4, image_size=32)
        paths[kind] = fit_and_save(model, loader, 1, str(root / f"{kind}.ckpt"))
    return paths


def _args(config, tmp_path, autoencoder):
    return ["fit", "--config", os.path.join(ROOT, "configs", config), "--model.init_args.autoencoder", autoencoder,
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
            "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"]  # fmt: skip


@pytest.mark.parametrize("config", ["prior/ar_shapes.yaml", pytest.param("prior/ar_stream_shapes.yaml", marks=pytest.mark.slow),
                                    "prior/maskgit_shapes.yaml",
                                    pytest.param("diffusion/latent_shapes.yaml", marks=pytest.mark.slow)])  # fmt: skip
def test_config_runs_fast_dev_run(config, autoencoders32, tmp_path):
    ae = autoencoders32["kl" if "latent" in config else "vq"]
    proc = run_cli([*_args(config, tmp_path, ae), "--trainer.fast_dev_run", "2"], tmp_path)
    assert "max_steps=2` reached" in proc.stdout + proc.stderr
    assert glob.glob(str(tmp_path / "runs" / "*" / "samples" / "step_*.png")), (
        "a sample grid at the validation"
    )


def test_prior_predicts_from_its_checkpoint_and_the_autoencoder_path(autoencoders32, tmp_path):
    run_cli([*_args("prior/ar_shapes.yaml", tmp_path, autoencoders32["vq"]), "--trainer.max_steps", "1",
             "--trainer.limit_val_batches", "1", "--run_name", "ar"],
            tmp_path)  # fmt: skip
    last = tmp_path / "runs" / "ar" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["autoencoder"] == autoencoders32["vq"]
    assert not any(k.startswith("autoencoder.") for k in state["state_dict"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na large blue square on the left\n")
    run_cli(["predict", "--config", os.path.join(ROOT, "configs", "prior", "ar_shapes.yaml"), "--ckpt_path", str(last),
             "--model.init_args.autoencoder", autoencoders32["vq"], "--trainer.default_root_dir", str(tmp_path / "runs"),
             "--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
             "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20", "--data.init_args.predict_prompts", str(prompts),
             "--data.init_args.num_workers", "0", "--run_name", "pred"], tmp_path)  # fmt: skip
    pngs = os.listdir(tmp_path / "runs" / "pred" / "predictions")
    assert len([p for p in pngs if "seed" in p]) == 2


@pytest.mark.slow
def test_an_autoencoder_that_cannot_work_fails_in_one_line(autoencoders32, tmp_path):
    for ae, says in ((str(tmp_path / "missing.ckpt"), "model.init_args.autoencoder: autoencoder checkpoint"),
                     (autoencoders32["kl"], "is a KLAutoencoder, but a token prior needs discrete codes")):  # fmt: skip
        proc = run_cli([*_args("prior/ar_shapes.yaml", tmp_path, ae), "--trainer.fast_dev_run", "1"], tmp_path,
                       expect_failure=True)  # fmt: skip
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and says in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli([*_args("prior/maskgit_shapes.yaml", tmp_path, autoencoders32["vq"]), "--trainer.fast_dev_run", "1",
                    "--model.init_args.transformer.init_args.vocab_size", "1024"], tmp_path, expect_failure=True)  # fmt: skip
    assert "vocab_size is 1024 but the autoencoder" in proc.stderr and "set vocab_size to 512" in proc.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing was made
