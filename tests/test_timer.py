"""The training-time budget: validation inside fit is not charged to it, the state resumes, and
train.py refuses a malformed or doubled budget before any work."""

import os
import subprocess
import sys
import time

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader, TensorDataset

from callbacks.timer import TrainingTimer
from evaluation.retrain import command, progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATION_SECONDS = 0.3  # each validation sleeps this long; a training step 0.02 s


class Sleepy(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(VALIDATION_SECONDS)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FitWall(Callback):
    validations = 0

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic()

    def on_validation_end(self, trainer, pl_module):
        self.validations += not trainer.sanity_checking

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.monotonic() - self.start


def _fit(timer, tmp_path, ckpt_path=None):
    data = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)
    wall = FitWall()
    trainer = Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, val_check_interval=5, limit_val_batches=1,
                      num_sanity_val_steps=1, callbacks=[timer, wall], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Sleepy(), data, data, ckpt_path=ckpt_path)
    return trainer, wall


def test_validation_inside_fit_is_not_charged_and_the_budget_resumes(tmp_path):
    trainer, wall = _fit(TrainingTimer("00:00:00:02"), tmp_path)
    timer = next(c for c in trainer.callbacks if isinstance(c, TrainingTimer))
    validations = wall.validations  # every 5 steps; the sanity check before training is not counted
    assert validations >= 4
    assert timer.validation_seconds() == pytest.approx(validations * VALIDATION_SECONDS, rel=0.3)
    assert 2.0 <= timer.time_elapsed() < 2.6  # training alone, stopped at the first step past the budget
    assert wall.seconds == pytest.approx(timer.time_elapsed() + timer.validation_seconds(), abs=0.3)
    plain, _ = _fit(Timer("00:00:00:02", interval="step"), tmp_path / "plain")  # Lightning's: validation counted
    assert trainer.global_step > 1.5 * plain.global_step
    path = str(tmp_path / "budget.ckpt")
    trainer.save_checkpoint(path)
    steps, seconds = progress(path)  # what evaluate.py --train reads to skip or continue a run
    assert steps == trainer.global_step and seconds == pytest.approx(timer.time_elapsed(), abs=0.05)
    resumed, _ = _fit(TrainingTimer("00:00:00:03"), tmp_path / "resumed", ckpt_path=path)
    again = next(c for c in resumed.callbacks if isinstance(c, TrainingTimer))
    assert 3.0 <= again.time_elapsed() < 3.6  # one more second of training, not three
    assert again.validation_seconds() > timer.validation_seconds()
    assert resumed.global_step - trainer.global_step < 0.7 * trainer.global_step


def test_retrain_charges_training_time_alone():
    cmd = command({"train_root": "runs"}, "ldm", {"config": "c.yaml", "max_time": "00:00:20:00"}, resume=False)
    assert cmd[cmd.index("--max_train_time") + 1] == "00:00:20:00"
    assert cmd[cmd.index("--trainer.max_time") + 1] == "null"
    steps_only = command({}, "ldm", {"config": "c.yaml", "max_steps": 5}, resume=False)
    assert "--max_train_time" not in steps_only


@pytest.mark.parametrize(
    "args, said",
    [
        (["--max_train_time", "20min"], "--max_train_time '20min' is not DD:HH:MM:SS"),
        (["--max_train_time", "00:00:20:00", "--trainer.max_time", "00:00:10:00"], "are both set"),
    ],
)
def test_train_py_refuses_a_bad_budget_before_any_work(tmp_path, args, said):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config",
                           os.path.join(ROOT, "tests", "configs", "tiny.yaml"), "--data", "datamodules.ShapesDataModule",
                           "--data.init_args.root", str(tmp_path / "data"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")
