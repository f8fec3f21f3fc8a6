"""What every training run sends to W&B for one comparable dashboard, read back from an offline
run's file: tags for its family and method, a group per experiment config, perf/ throughput."""

import glob
import os

from test_cli import ROOT, run_cli

from callbacks.dashboard import experiment_group, run_tags
from evaluation.wandb_records import history_keys, records


def test_tags_and_groups_name_the_family_method_and_experiment():
    assert run_tags("lightning_modules.diffusion.TextToImageDiffusion") == ["diffusion", "text_to_image_diffusion"]
    assert run_tags("lightning_modules.gan.TextToImageGAN") == ["gan", "text_to_image_gan"]
    assert run_tags("lightning_modules.priors.MaskGITPrior") == ["vq", "mask_git_prior"]
    assert run_tags("lightning_modules.autoencoder.KLAutoencoder")[0] == "vae"
    assert run_tags("lightning_modules.autoencoder.VQAutoencoder")[0] == "vq"
    assert run_tags("lightning_modules.cvae.ConditionalVAE") == ["vae", "conditional_vae"]
    assert run_tags("lightning_modules.clip_guided.CLIPRerank") == ["clip", "clip_rerank"]
    assert experiment_group(["/x/configs/trainer/cpu.yaml", "/x/configs/diffusion/shapes32.yaml"]) == "diffusion/shapes32"
    assert experiment_group([]) is None


def test_an_offline_run_carries_tags_group_and_throughput(tmp_path):
    runs = tmp_path / "runs"
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "clip", "clip_shapes.yaml"), "--run_name", "dash",
             "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "4",
             "--trainer.max_time", "00:00:10:00",
             "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
             "--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
             "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"], tmp_path)  # fmt: skip
    path = glob.glob(str(runs / "dash" / "wandb" / "offline-run-*" / "run-dash.wandb"))[0]
    run = next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
    assert set(run.tags) == {"clip"} and run.run_group == "clip/clip_shapes" and run.run_id == "dash"
    keys = history_keys(path)
    assert {"perf/samples_per_sec", "perf/steps_per_sec", "train/loss", "val/retrieval_t2i_r1"} <= keys, keys
