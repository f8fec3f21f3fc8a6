"""What a run tells its user as it goes: where everything is, progress lines for log files,
and a summary with the commands to use the result."""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
import time

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.loggers import WandbLogger

from .stopping import SaveLastCheckpoint, last_checkpoint_path
from .timer import TrainingTimer


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _time_remaining(trainer) -> float | None:
    """Seconds of training left before ``max_time`` (None without one)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return None if timer is None else timer.time_remaining("train")


class ProgressLog(Callback):
    """A progress line every ``every_seconds`` (step, steps per second, loss, latest held-out
    score, time left), for runs whose output goes to a file, where Lightning's progress bar
    prints nothing.

    Args:
        every_seconds: interval between lines.
        when: ``auto`` (only when standard output is not a terminal), ``always`` or ``never``.
    """

    def __init__(self, every_seconds: float = 30.0, when: str = "auto"):
        self.every_seconds, self.when = every_seconds, when
        self._start = self._last_time = None
        self._last_step = 0

    def writes_lines(self) -> bool:
        """Whether progress lines go to a log file (standard output is not a terminal). Then they
        are the only progress output: ``train.py`` removes Lightning's progress bar, whose final
        state would otherwise be written into the file too."""
        return self.when != "never" and not sys.stdout.isatty()

    def _active(self, trainer) -> bool:
        if not trainer.is_global_zero or self.when == "never":
            return False
        return self.when == "always" or self.writes_lines()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last_time = time.monotonic()
        self._last_step = trainer.global_step

    def time_left(self, trainer, rate: float) -> float | None:
        """Seconds until ``max_steps`` at ``rate`` or until ``max_time``, whichever comes first."""
        left = []
        if trainer.max_steps and trainer.max_steps > 0 and rate > 0:
            left.append((trainer.max_steps - trainer.global_step) / rate)
        remaining = _time_remaining(trainer)
        if remaining is not None:
            left.append(remaining)
        return min(left) if left else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._last_time is None or not self._active(trainer):
            return
        now = time.monotonic()
        if now - self._last_time < self.every_seconds:
            return
        rate = (trainer.global_step - self._last_step) / (now - self._last_time)
        parts = [f"step {trainer.global_step}", f"{rate:.2f} steps/s"]
        parts += [f"{k} {float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                  if k.startswith("train/") and k.endswith("loss")]  # fmt: skip
        score = trainer.callback_metrics.get("val/shapes_all_correct")
        if score is not None:
            parts.append(f"held-out {float(score):.3f}")
        left = self.time_left(trainer, rate)
        parts.append(f"elapsed {_minutes(now - self._start)}")
        if left is not None:
            parts.append(f"left ~{_minutes(left)}")
        print(" | ".join(parts), flush=True)
        self._last_time, self._last_step = now, trainer.global_step


class RunSummary(Callback):
    """Says where a run writes (run directory, samples, checkpoints, the W&B folder and its
    ``wandb sync`` command) when training starts, and at the end of ``fit`` prints the best
    checkpoint and its score, the final sample grid, and the commands to generate from it and
    to continue training."""

    def __init__(self):
        self._start = None

    @staticmethod
    def wandb_folder(trainer) -> str | None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = getattr(logger.experiment, "dir", None)  # .../wandb/<run folder>/files
                return os.path.dirname(run_dir) if isinstance(run_dir, str) else None
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        if not trainer.is_global_zero:
            return
        run = _rel(trainer.default_root_dir)
        lines = [f"run directory: {run}", f"  sample grids: {os.path.join(run, 'samples')}/",
                 f"  checkpoints:  {os.path.join(run, 'checkpoints')}/"]  # fmt: skip
        folder = self.wandb_folder(trainer)
        if folder is not None:
            offline = any(getattr(lg, "_offline", False) for lg in trainer.loggers)
            lines.append(f"  W&B:          {_rel(folder)}" + (f" (offline; upload with: wandb sync {_rel(folder)})" if offline else ""))  # fmt: skip
        print("\n".join(lines), flush=True)

    def summary(self, trainer) -> list[str]:
        run = trainer.default_root_dir
        elapsed = time.monotonic() - self._start if self._start else 0.0
        stop = next((c for c in trainer.callbacks if isinstance(c, SaveLastCheckpoint) and c.requested), None)
        reason = f"stopped by {stop.requested}" if stop else "finished"
        lines = [f"{reason} at step {trainer.global_step} after {_minutes(elapsed)} min"]
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if best:
            score = checkpoint.best_model_score
            lines.append(f"best {checkpoint.monitor}: {float(score):.4f} in {_rel(best)}" if score is not None
                         else f"best checkpoint: {_rel(best)}")  # fmt: skip
        last = last_checkpoint_path(trainer)
        last = last if os.path.isfile(last) else ""  # saved at the end even when nothing validated
        grids = sorted(glob.glob(os.path.join(run, "samples", "step_*.png")))
        if grids:
            lines.append(f"final sample grid: {_rel(grids[-1])}")
        reconstructions = sorted(glob.glob(os.path.join(run, "samples", "recon_*.png")))
        if reconstructions:
            lines.append(f"final reconstructions: {_rel(reconstructions[-1])}")
        use = best or last
        generates = hasattr(trainer.lightning_module, "generate")
        is_clip = hasattr(trainer.lightning_module, "encode_text")
        is_damsm = is_clip and hasattr(trainer.lightning_module, "gammas")
        if use and is_damsm:  # AttnGAN's encoders
            lines.append(f"build on it: --model.init_args.damsm {_rel(use)} (configs/gan/attngan_shapes32.yaml)")
        elif use and is_clip:  # a CLIP: for reranking, guidance, or as a frozen text encoder
            lines.append(f"use it: --model.init_args.clip {_rel(use)} (configs/clip/rerank.yaml, vqgan_clip.yaml), or "
                         f"as a text encoder: lightning_modules.clip.CLIPTextEncoder with path {_rel(use)}")  # fmt: skip
        elif use and not generates and hasattr(trainer.lightning_module, "encode"):  # an autoencoder: the first
            # stage of the methods that build on it (not, e.g., unCLIP's prior, which configs/unclip/ joins)
            lines.append(f"build on it: --model.init_args.autoencoder {_rel(use)} (token priors, latent diffusion, CLIP guidance)")
        if use and generates:
            config = os.path.join(run, "config.yaml")
            lines.append("generate from it: python train.py predict --config " + shlex.quote(_rel(config))
                         + " --ckpt_path " + shlex.quote(_rel(use))
                         + " --data.init_args.predict_prompts 'a small red circle on the left'")  # fmt: skip
        if not last:
            return lines  # nothing to continue from (a fast_dev_run saves nothing)
        further = self.longer(trainer) if stop is None else ""
        first = self.first_command(run, drop=further.split()[:1])
        again = first or f"fit --config {shlex.quote(_rel(os.path.join(run, 'config.yaml')))}"
        lines.append(f"continue training: python train.py {again} --run_name {shlex.quote(os.path.basename(run))} --ckpt_path last{further}")  # fmt: skip
        return lines

    @staticmethod
    def first_command(run: str, drop: list[str]) -> str | None:
        """The command that made the run (from its ``run.json``), without its run name,
        checkpoint and ``drop`` options."""
        try:
            with open(os.path.join(run, "run.json")) as f:
                argv = json.load(f).get("command", [])[1:]
        except (OSError, ValueError):
            return None
        kept, skip = [], False
        for arg in argv:
            if skip:
                skip = False
            elif arg in ("--run_name", "--ckpt_path", *drop):
                skip = True
            elif not arg.startswith(tuple(f"{name}=" for name in ("--run_name", "--ckpt_path", *drop))):
                kept.append(arg)
        return shlex.join(kept) if kept else None

    @staticmethod
    def longer(trainer) -> str:
        """The option that lets a continued run go on past the limit that ended this one."""
        if trainer.max_steps and 0 < trainer.max_steps <= trainer.global_step:
            return f" --trainer.max_steps {2 * trainer.max_steps}"
        remaining = _time_remaining(trainer)
        if remaining is not None and remaining <= 0:
            timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
            total = int(2 * timer._duration)  # the elapsed time is restored with the run
            days, rest = divmod(total, 86400)
            option = "--max_train_time" if isinstance(timer, TrainingTimer) else "--trainer.max_time"
            return f" {option} {days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        return ""

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            print("\n".join(["", *self.summary(trainer)]), flush=True)
