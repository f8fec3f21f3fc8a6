"""A new user's first hour: the main job's schedule, stopping without loss, the end-of-run
summary and its commands, and mistakes reported in one line before any work."""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_cli import ROOT, TINY, run_cli

from callbacks.threads import ThreadBudget, thread_budget

MAIN_JOB = os.path.join(ROOT, "configs", "diffusion", "shapes.yaml")
SHAPES_TRAINER = os.path.join(ROOT, "configs", "trainer", "cpu_shapes.yaml")


def _data(shapes16):
    return ["--data.init_args.root", shapes16, "--data.init_args.num_train", "600", "--data.init_args.num_val", "64",
            "--data.init_args.shard_size", "100", "--data.init_args.batch_size", "8"]  # fmt: skip


def _ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_main_job_schedules_by_wall_time_within_the_first_minutes():
    with open(SHAPES_TRAINER) as f:
        trainer = yaml.safe_load(f)
    h, m, s = (int(x) for x in trainer["val_check_interval"].split(":")[1:])
    assert h * 3600 + m * 60 + s <= 120  # grid, held-out score and checkpoint every 2 minutes at most
    d, h, m, s = (int(x) for x in trainer["max_time"].split(":"))
    assert d == 0 and h * 60 + m <= 45  # and it stops by itself
    assert trainer["max_steps"] > 0
    with open(MAIN_JOB) as f:
        assert yaml.safe_load(f)["trainer"] == "../trainer/cpu_shapes.yaml"


def test_main_job_config_gives_a_grid_a_score_and_checkpoints_and_its_summary_commands_work(
    shapes16, tmp_path
):
    """The main job as configured (only the step count and the data size shrunk): the run ends
    with a sample grid, a held-out score and checkpoints, and prints a predict command that works."""
    runs = str(tmp_path / "runs")
    proc = run_cli(["fit", "--config", MAIN_JOB, *_data(shapes16), "--trainer.max_steps", "3",
                    "--trainer.default_root_dir", runs, "--run_name", "main"], tmp_path)  # fmt: skip
    out = proc.stdout
    run = os.path.join(runs, "main")
    assert glob.glob(os.path.join(run, "samples", "step_*.png"))
    assert _ckpt_step(os.path.join(run, "checkpoints", "last.ckpt")) == 3  # the end of the run is saved
    best = re.search(r"best val/shapes_all_correct: [0-9.]+ in (\S+)", out)
    assert best and os.path.exists(tmp_path / best.group(1))
    assert "run directory:" in out and "wandb sync" in out and "final sample grid:" in out
    assert "Epoch " not in out + proc.stderr  # output in a file: no progress bar, only progress lines
    predict = re.search(r"generate from it: python train.py (.*)", out).group(1)
    assert "continue training: python train.py fit --config " in out and "--ckpt_path last" in out
    run_cli([*shlex.split(predict), "--trainer.enable_progress_bar", "false"], tmp_path)
    written = os.listdir(os.path.join(run, "predictions"))  # beside the checkpoint's run
    assert "grid.png" in written and any(p.endswith("seed0.png") for p in written)
    again = re.search(r"continue training: python train.py (.*)", out).group(1)
    assert "--trainer.max_steps 6" in again and again.count("--trainer.max_steps") == 1
    resumed = run_cli([*shlex.split(again), "--trainer.enable_progress_bar", "false"], tmp_path)
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert _ckpt_step(os.path.join(run, "checkpoints", "last.ckpt")) == 6


@pytest.mark.parametrize(("sig", "name", "group"), [(signal.SIGTERM, "SIGTERM", False),
                                                    pytest.param(signal.SIGTERM, "SIGTERM", True, marks=pytest.mark.slow),
                                                    pytest.param(signal.SIGINT, "Ctrl-C", False, marks=pytest.mark.slow)])  # fmt: skip
def test_sigterm_or_ctrl_c_saves_a_checkpoint_that_fit_last_continues(sig, name, group, shapes16, tmp_path):
    """To the main process, or (``group``) to every process of the run, loader workers included, as
    ``kill -- -PGID``, ``timeout`` or a container's stop send it."""
    runs = str(tmp_path / "runs")
    args = ["fit", "--trainer", SHAPES_TRAINER, "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"),
            "--config", TINY, *_data(shapes16), "--trainer.default_root_dir", runs,
            "--trainer.callbacks+=callbacks.ProgressLog", "--trainer.callbacks.every_seconds=0.2",
            "--trainer.callbacks.when=always", "--trainer.enable_progress_bar", "false",
            *(["--data.init_args.num_workers", "2"] if group else [])]  # fmt: skip
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    env.pop("T2I_RUN_DIR", None)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--run_name", "stopped"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)  # fmt: skip
    deadline, lines = time.time() + 240, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        progress = re.match(r"step (\d+) \|", line)
        if progress and int(progress.group(1)) >= 20:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            break
        if not line and proc.poll() is not None:
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    last = os.path.join(runs, "stopped", "checkpoints", "last.ckpt")
    assert os.path.exists(last), output[-3000:]
    step = _ckpt_step(last)
    assert step >= 20 and f"{name}: saved {last}" in output
    resumed = run_cli(
        ["fit", *args[1:], "--ckpt_path", "last", "--trainer.max_steps", str(step + 3)], tmp_path
    )
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert _ckpt_step(last) == step + 3


def _fails_in_one_line(args, cwd):
    """The command stops with exit code 2 and a single ``error:`` line (no traceback)."""
    proc = run_cli(args, cwd, expect_failure=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_wrong_shard_path_fails_in_one_line_before_any_run_folder_or_wandb_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard-00000.tar").write_bytes(b"")
    error = _fails_in_one_line(["fit", "--config", TINY, "--data", "datamodules.TextImageDataModule",
                                "--data.init_args.train_shards", "mine/{00000..00009}.tar"], tmp_path)  # fmt: skip
    assert "none of the 10 shard(s) exist" in error and "pass the folder" in error and "mine" in error
    assert not os.path.exists(tmp_path / "runs") and not glob.glob(
        str(tmp_path / "**" / "wandb"), recursive=True
    )
    error = _fails_in_one_line(["fit", "--config", TINY, "--data", "datamodules.TextImageDataModule",
                                "--data.init_args.train_shards", "mine", "--ckpt_path", "nope.ckpt"], tmp_path)  # fmt: skip
    assert "--ckpt_path nope.ckpt: no such file" in error
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_config_typos_get_a_suggestion_and_abbreviations_are_refused(tmp_path):
    error = _fails_in_one_line(
        ["fit", "--config", TINY, "--trainer.max_step", "5", "--print_config"], tmp_path
    )
    assert "--trainer.max_step" in error and "did you mean --trainer.max_steps?" in error
    error = _fails_in_one_line(
        ["fit", "--config", TINY, "--model.init_args.image_sise", "8", "--print_config"], tmp_path
    )
    assert "'image_sise' is not an option of tiny_module.TinyRegression; did you mean image_size?" in error
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_step: 5\n")
    error = _fails_in_one_line(["fit", "--config", TINY, "--config", str(typo), "--print_config"], tmp_path)
    assert "trainer.max_step is not an option; did you mean trainer.max_steps?" in error


@pytest.mark.parametrize(
    ("cores", "workers", "processes", "threads"),
    [(2, 0, 1, 2), (2, 2, 1, 1), (2, 1, 1, 1), (16, 2, 2, 6), (4, 8, 1, 1)],
)
def test_threads_are_the_cores_the_loader_workers_leave(cores, workers, processes, threads):
    assert thread_budget(cores, workers, processes) == threads


def test_thread_budget_keeps_a_count_the_user_chose(monkeypatch):
    class Trainer:
        class strategy:  # noqa: N801
            class root_device:  # noqa: N801
                type = "cpu"

        class datamodule:  # noqa: N801
            num_workers = 0

        num_devices = 1

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        ThreadBudget().setup(Trainer(), None, "fit")
        assert torch.get_num_threads() == 1  # the environment's choice is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("callbacks.threads.available_cores", lambda: 2)
        ThreadBudget().setup(Trainer(), None, "fit")
        assert torch.get_num_threads() == 2
        ThreadBudget(threads=1).setup(Trainer(), None, "fit")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
