"""The real entry point, run as a user runs it: fit, resume, predict, W&B offline files."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


def run_cli(args, cwd, timeout=300, expect_failure=False, env_extra=None):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},  # tests may run inside a job
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
        **(env_extra or {}),
    }
    env.pop("T2I_RUN_DIR", None)
    proc = run_processes([sys.executable, os.path.join(ROOT, "train.py"), *args], timeout, cwd=cwd, env=env)
    if expect_failure:
        assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _common(shapes16, runs):
    return [
        "--trainer", os.path.join(ROOT, "configs", "trainer", "cpu.yaml"),
        "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"),
        "--config", TINY,
        "--data.init_args.root", shapes16, "--data.init_args.num_train", "600", "--data.init_args.num_val", "64",
        "--data.init_args.shard_size", "100", "--data.init_args.num_workers", "0",
        "--data.init_args.train_batches_per_epoch", "5", "--data.init_args.batch_size", "8",
        "--trainer.default_root_dir", runs, "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_fit_resume_predict_and_offline_wandb(shapes16, tmp_path):
    runs = str(tmp_path / "runs")
    grid = ["--trainer.callbacks+=callbacks.SampleGrid", "--trainer.callbacks.prompts=[a red circle,two blue squares]",
            "--trainer.callbacks.every_n_steps=5"]  # fmt: skip
    run_cli(
        ["fit", *_common(shapes16, runs), "--trainer.max_epochs", "2", "--run_name", "first", *grid], tmp_path
    )
    run_dir = os.path.join(runs, "first")
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert len(glob.glob(os.path.join(run_dir, "samples", "step_*.png"))) >= 2
    ckpt = torch.load(
        os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 10
    offline = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(offline) == 1
    records = open(glob.glob(os.path.join(offline[0], "*.wandb"))[0], "rb").read()
    assert b"train/loss" in records and b"val/loss" in records and b"data/skipped" in records
    assert glob.glob(os.path.join(offline[0], "files", "media", "images", "*.png"))

    # another experiment (another --config file), run after it: the newest run under the root
    other = tmp_path / "other.yaml"
    other.write_text(open(TINY).read())
    other_args = [a if a != TINY else str(other) for a in _common(shapes16, runs)]
    run_cli(["fit", *other_args, "--trainer.max_steps", "2", "--run_name", "other"], tmp_path)
    # resume: --ckpt_path last finds the run of this experiment, not the newest, and continues its step count
    run_cli(["fit", *_common(shapes16, runs), "--trainer.max_epochs", "3", "--ckpt_path", "last"], tmp_path)
    ckpt = torch.load(
        os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 15
    assert _ckpt(os.path.join(runs, "other", "checkpoints", "last.ckpt"))["global_step"] == 2
    # two runs of one experiment: which one is meant is not guessed
    run_cli(["fit", *other_args, "--trainer.max_steps", "2", "--run_name", "other2"], tmp_path)
    proc = run_cli(["fit", *other_args, "--ckpt_path", "last"], tmp_path, expect_failure=True)
    assert "2 runs under" in proc.stderr and "other2" in proc.stderr and "--run_name" in proc.stderr
    assert not os.path.exists(os.path.join(runs, "other", "checkpoints", "epoch=0-step=4.ckpt"))
    never = tmp_path / "never.yaml"
    never.write_text(open(TINY).read())
    never_args = [a if a != TINY else str(never) for a in _common(shapes16, runs)]
    proc = run_cli(["fit", *never_args, "--ckpt_path", "last"], tmp_path, expect_failure=True)
    assert "no run under" in proc.stderr and "first" in proc.stderr and "other2" in proc.stderr

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na large blue square on the left\n")
    run_cli(["predict", *_common(shapes16, runs), "--ckpt_path", os.path.join(run_dir, "checkpoints", "last.ckpt"),
             "--data.init_args.predict_prompts", str(prompts), "--data.init_args.predict_seeds", "[0, 1]",
             "--run_name", "pred"], tmp_path)  # fmt: skip
    pngs = sorted(os.listdir(os.path.join(runs, "pred", "predictions")))
    assert len([p for p in pngs if "seed" in p]) == 4 and "grid.png" in pngs


def test_bad_config_fails_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", TINY,
                           "--data", "datamodules.ShapesDataModule", "--data.init_args.resolutoin", "16"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "resolutoin" in proc.stderr
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")


CONFIGS = sorted(c for c in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "compare" + os.sep not in c)  # compare configs are evaluate.py's (test_evaluate)  # fmt: skip


def _print_config_args(config: str) -> list[str]:
    rel = os.path.relpath(config, os.path.join(ROOT, "configs"))
    if rel.startswith("data" + os.sep):
        return ["fit", "--config", TINY, "--data", config, "--print_config"]
    if rel.startswith("trainer" + os.sep):
        return ["fit", "--config", TINY, "--trainer", config, "--print_config"]
    return ["fit", "--config", config, "--print_config"]


@pytest.fixture(scope="module")
def printed_configs(tmp_path_factory):
    """``train.py fit --config <c> --print_config`` for every config, all in one process."""
    import json

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}  # fmt: skip
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "print_configs_script.py")],
                          input=json.dumps([_print_config_args(c) for c in CONFIGS]), capture_output=True,
                          text=True, timeout=600, cwd=tmp_path_factory.mktemp("print_config"), env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {c: r for c, r in zip(CONFIGS, results)}


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_parses(config, printed_configs):
    result = printed_configs[config]
    assert result["code"] == 0 and "class_path" in result["stdout"], result["stderr"][-3000:]


def _tiny_bert(path, hidden=16):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)  # fmt: skip


SLOW = pytest.mark.slow  # the 16 px StackGAN config runs by default (the main job's in test_first_hour); the others as slow tests


@pytest.mark.parametrize("config", [pytest.param("diffusion/shapes.yaml", marks=SLOW),  # the main job runs in test_first_hour
                                    pytest.param("diffusion/shapes32.yaml", marks=SLOW),
                                    pytest.param("diffusion/layout_shapes32.yaml", marks=SLOW),
                                    pytest.param("diffusion/shapes_sr.yaml", marks=SLOW),
                                    pytest.param("diffusion/shards_gpu.yaml", marks=SLOW),
                                    pytest.param("diffusion/shards_gpu_sr256.yaml", marks=SLOW), "gan/stackgan1_shapes.yaml", "gan/stylegan_shapes32.yaml",
                                    pytest.param("gan/stackgan1_shapes32.yaml", marks=SLOW),
                                    pytest.param("gan/stackganpp_shapes.yaml", marks=SLOW),
                                    pytest.param("gan/stackganpp_shards_gpu.yaml", marks=SLOW)])  # fmt: skip
def test_method_config_runs_fast_dev_run(config, shapes16, tmp_path):
    args = ["fit", "--config", os.path.join(ROOT, "configs", config), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]  # fmt: skip
    if "gan/" in config and "shards" in config:  # the GPU GAN config, shrunk to a CPU step
        _tiny_bert(str(tmp_path / "bert"), hidden=768)  # the config's text_dim
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true",
                 "--data.init_args.train_shards", os.path.join(shapes16, "train"),
                 "--data.init_args.val_shards", os.path.join(shapes16, "val"), "--data.init_args.val_samples", "4",
                 "--model.init_args.generator.init_args.channels", "64",
                 "--model.init_args.text_encoder.init_args.path", str(tmp_path / "bert")]  # fmt: skip
    elif "shards" in config:  # GPU configs, shrunk to run on a CPU with a tiny local encoder
        _tiny_bert(str(tmp_path / "bert"))
        size = 32 if "sr256" in config else 16
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true",
                 "--data.init_args.train_shards", os.path.join(shapes16, "train"),
                 "--data.init_args.val_shards", os.path.join(shapes16, "val"), "--data.init_args.val_samples", "4",
                 "--data.init_args.image_size", str(size), "--model.init_args.image_size", str(size),
                 "--model.init_args.denoiser.init_args.base_channels", "16",
                 "--model.init_args.denoiser.init_args.context_dim", "16",
                 "--model.init_args.text_encoder.init_args.path", str(tmp_path / "bert")]  # fmt: skip
        if "sr256" in config:
            args += ["--model.init_args.low_res_size", "16"]
    else:
        args += ["--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
                 "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "max_steps=1` reached" in proc.stdout + proc.stderr
    # the summary offers to continue only from a checkpoint that exists (a fast_dev_run saves none,
    # except through Lightning's own end-of-training save of a ModelCheckpoint with save_last)
    saved = glob.glob(str(tmp_path / "runs" / "*" / "checkpoints" / "last.ckpt"))
    assert ("continue training" in proc.stdout) == bool(saved)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_gan_stage_one_under_ddp_then_stage_two_on_its_checkpoint(shapes16, tmp_path):
    """Stage I: two CPU processes (gloo) with the GAN's DDP strategy, one epoch of 3 batches,
    which is 6 optimizer steps; then stage II trains on top of that checkpoint."""
    runs = str(tmp_path / "runs")
    data = ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
            "--trainer.default_root_dir", runs, "--trainer.enable_progress_bar", "false"]  # fmt: skip
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "gan", "stackgan1_shapes.yaml"), *data,
             "--data.init_args.root", shapes16, "--data.init_args.num_train", "600", "--data.init_args.num_val", "64",
             "--data.init_args.shard_size", "100", "--data.init_args.train_batches_per_epoch", "3",
             "--data.init_args.val_samples", "8", "--trainer.max_epochs", "1",
             "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true",
             "--run_name", "stage1"], tmp_path, timeout=400)  # fmt: skip
    last = os.path.join(runs, "stage1", "checkpoints", "last.ckpt")
    ckpt = _ckpt(last)
    assert ckpt["global_step"] == 6 and ckpt["gan_steps"] == {"g": 3, "d": 3}
    assert "val/shapes_all_correct" in str(
        ckpt["callbacks"]
    )  # the best checkpoint is ranked by the shapes score
    proc = run_cli(["fit", "--config", os.path.join(ROOT, "configs", "gan", "stackgan2_shapes.yaml"), *data,
                    "--model.init_args.stage1_checkpoint", last, "--trainer.fast_dev_run", "1",
                    "--data.init_args.root", str(tmp_path / "shapes32"), "--data.init_args.num_train", "40",
                    "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"], tmp_path)  # fmt: skip
    assert "max_steps=1` reached" in proc.stdout + proc.stderr


def test_cascade_predict_config_generates_from_two_checkpoints(shapes16, tmp_path):
    """configs/diffusion/cascade_predict.yaml run through predict on a tiny base and a tiny
    super-resolution checkpoint: 8 px base images upsampled to 16 px."""
    from test_diffusion import save_untrained, tiny

    from lightning_modules.diffusion import SuperResolutionDiffusion

    base = tiny(image_size=8)
    sr = tiny(image_size=16, cls=SuperResolutionDiffusion, cond_channels=3, low_res_size=8)
    base_path, sr_path = save_untrained(tmp_path, base=base, sr=sr)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    run_cli(["predict", "--config", os.path.join(ROOT, "configs", "diffusion", "cascade_predict.yaml"),
             "--model.init_args.base_checkpoint", base_path, "--model.init_args.sr_checkpoints", f"[{sr_path}]",
             "--model.init_args.base_sampling", "{steps: 3}", "--model.init_args.sr_sampling", "{steps: 3}",
             "--data.init_args.root", shapes16, "--data.init_args.resolution", "16", "--data.init_args.num_train", "600",
             "--data.init_args.num_val", "64", "--data.init_args.shard_size", "100",
             "--data.init_args.predict_prompts", str(prompts), "--data.init_args.predict_seeds", "[0, 1]",
             "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "cascade",
             "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
    out = os.path.join(tmp_path, "runs", "cascade", "predictions")
    images = sorted(p for p in os.listdir(out) if "seed" in p)
    assert len(images) == 4 and "grid.png" in os.listdir(out)
    from PIL import Image

    assert Image.open(os.path.join(out, images[0])).size == (16, 16)
