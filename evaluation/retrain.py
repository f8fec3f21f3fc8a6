"""``evaluate.py --train``: train every run a compare config names under ``train``, each at its
stated budget, resumably, so that anyone can remake the table's checkpoints with one command.

A compare config's ``train`` maps run names to ``train.py fit`` invocations, in order (a prior's
autoencoder before the prior)::

    train_root: runs
    train:
      vqgan: {config: configs/autoencoder/vqgan_shapes.yaml, max_time: "00:00:45:00"}
      maskgit: {config: configs/prior/maskgit_shapes.yaml, max_time: "00:00:45:00",
                args: {model.init_args.autoencoder: runs/vqgan/checkpoints/last.ckpt}}

Each run lands in ``<train_root>/<name>/`` (its ``checkpoints/last.ckpt`` is what a method's
``checkpoint`` names). A run whose ``last.ckpt`` has reached its budget (``max_steps``, or
``max_time`` of training time, validation inside fit not counted (``train.py --max_train_time``,
``callbacks.TrainingTimer``); the trainer config's own
epochs, steps and time are lifted) is skipped; one that stopped short is continued with
``--ckpt_path last``; the others start fresh. Every row is then its run's ``last.ckpt``.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable

import torch

from evaluation.harness import training_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_KEYS = {
    "config": "the train.py --config file of the run",
    "max_steps": "budget: optimizer steps (Lightning's global step)",
    "max_time": "budget: training wall time, DD:HH:MM:SS",
    "args": "{option: value} for train.py, e.g. {model.init_args.autoencoder: runs/vqgan/checkpoints/last.ckpt}",
}


class TrainProblem(ValueError):
    pass


def seconds(max_time: str) -> float:
    """``DD:HH:MM:SS`` (Lightning's ``max_time`` string) in seconds."""
    parts = str(max_time).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise TrainProblem(f"max_time {max_time!r} is not DD:HH:MM:SS (e.g. '00:00:45:00')")
    d, h, m, s = (int(p) for p in parts)
    return float(((d * 24 + h) * 60 + m) * 60 + s)


def entries(cfg: dict, where: str = "the compare config") -> dict[str, dict]:
    """The config's ``train`` runs, checked before any work: known keys, an existing ``config``
    file and a stated budget for each."""
    train = cfg.get("train") or {}
    if not isinstance(train, dict):
        raise TrainProblem(f"{where}: train must map run names to {{config, max_steps | max_time, args}}")
    for name, entry in train.items():
        if not isinstance(entry, dict) or "config" not in entry:
            raise TrainProblem(f"{where}: train.{name} needs a config (the train.py --config file)")
        for key in entry:
            if key not in ENTRY_KEYS:
                close = difflib.get_close_matches(key, list(ENTRY_KEYS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TrainProblem(
                    f"{where}: train.{name}: unknown key {key!r}{hint}; the keys are {', '.join(ENTRY_KEYS)}"
                )
        if not os.path.isfile(config_path(entry)):
            raise TrainProblem(f"{where}: train.{name}: config {entry['config']!r} not found")
        if "max_steps" not in entry and "max_time" not in entry:
            raise TrainProblem(
                f"{where}: train.{name} states no budget; give max_steps or max_time (or both), so that every row's "
                "budget is written down"
            )
        if "max_time" in entry:
            seconds(entry["max_time"])
        if not isinstance(entry.get("args") or {}, dict):
            raise TrainProblem(f"{where}: train.{name}.args must be a mapping of train.py options to values")
    return train


def config_path(entry: dict) -> str:
    """The run's config file: as given (from the working directory), else from the repository."""
    path = entry["config"]
    return path if os.path.isfile(path) or os.path.isabs(path) else os.path.join(ROOT, path)


def last_checkpoint(cfg: dict, name: str) -> str:
    return os.path.join(cfg.get("train_root") or "runs", name, "checkpoints", "last.ckpt")


def progress(path: str) -> tuple[int, float]:
    """``(global step, training seconds)`` of a checkpoint, as ``harness.training_budget`` reads them."""
    budget = training_budget(torch.load(path, map_location="cpu", weights_only=False))
    return budget["steps"], budget["train_seconds"] or 0.0


def _reached(entry: dict, step: int, spent: float) -> bool:
    return ("max_steps" in entry and step >= int(entry["max_steps"])) or (
        "max_time" in entry and spent >= seconds(entry["max_time"])
    )


def budget_reached(path: str, entry: dict) -> bool:
    return _reached(entry, *progress(path))


def _value(v) -> str:
    """A config value as a command-line value (lists and mappings in JSON, which jsonargparse reads)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def command(cfg: dict, name: str, entry: dict, resume: bool, python: str = sys.executable) -> list[str]:
    cmd = [python, os.path.join(ROOT, "train.py"), "fit", "--config", config_path(entry), "--run_name", name,
           "--trainer.default_root_dir", cfg.get("train_root") or "runs"]  # fmt: skip
    # the stated budget is the only limit: the trainer config's own epochs, steps or time are lifted
    cmd += ["--trainer.max_epochs", "-1", "--trainer.max_steps", str(int(entry.get("max_steps", -1))),
            "--trainer.max_time", "null"]  # fmt: skip
    if "max_time" in entry:  # training time alone: the validations inside fit are not charged to it
        cmd += ["--max_train_time", str(entry["max_time"])]
    for option, value in (entry.get("args") or {}).items():
        cmd += [f"--{option}", _value(value)]
    return cmd + (["--ckpt_path", "last"] if resume else [])


def train_all(
    cfg: dict, log: Callable[[str], None] = print, env: dict | None = None, only: list[str] | None = None
) -> dict[str, str]:
    """Train, continue or skip each run in order; ``{name: "trained" | "continued" | "done"}``.
    ``only`` names the runs to make (in the config's order; the others are left alone): two
    machines, or two pinned cores, can then train disjoint runs at once, each run after those it
    reads.
    The options of every run still to train are checked first (``train.py --print_config``), so a
    typo in the last run fails before the first one starts. A run that fails or stops short of its
    budget stops the command (the others stay as they are; the same command continues)."""
    status, runs = {}, entries(cfg)
    if only is not None:
        unknown = [n for n in only if n not in runs]
        if unknown:
            raise TrainProblem(f"--train-only: no run {', '.join(map(repr, unknown))} in train; the runs are "
                               f"{', '.join(runs)}")  # fmt: skip
        runs = {n: e for n, e in runs.items() if n in only}
    before = {
        n: progress(last_checkpoint(cfg, n)) if os.path.isfile(last_checkpoint(cfg, n)) else None
        for n in runs
    }
    todo = [n for n in runs if before[n] is None or not _reached(runs[n], *before[n])]
    problems = []  # every run's options are checked before the first one trains
    for name in todo:
        check = subprocess.run([*command(cfg, name, runs[name], resume=False), "--print_config"], env=env,
                               capture_output=True, text=True)  # fmt: skip
        if check.returncode != 0:
            lines = [line.strip() for line in check.stderr.splitlines() if line.strip()] or [
                "train.py failed"
            ]
            said = next(
                (line for line in lines if line.startswith("error:")), lines[-1]
            )  # train.py's one line
            problems.append(f"train.{name}: {said.removeprefix('error:').strip()}")
    if problems:
        raise TrainProblem("; ".join(problems) + " (nothing was trained)")
    for name, entry in runs.items():
        last = last_checkpoint(cfg, name)
        resume = before[name] is not None
        if name not in todo:
            step, spent = before[name]
            log(f"train {name}: done ({step:,} steps, {spent / 60:.1f} min), {last}")
            status[name] = "done"
            continue
        cmd = command(cfg, name, entry, resume)
        log(f"train {name}: {'continue' if resume else 'start'}: {shlex.join(cmd)}")
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise TrainProblem(
                f"train {name}: train.py exited with {rc}; fix the cause and run the same command again "
                f"(it continues from {last} when one was saved)"
            )
        if not os.path.isfile(last) or not budget_reached(last, entry):
            raise TrainProblem(
                f"train {name}: stopped before its budget ({last}); run the same command again to continue it"
            )
        status[name] = "continued" if resume else "trained"
    return status


def budget_lines(cfg: dict) -> list[str]:
    """One line per trained run for results.md: its config and budget, as stated."""
    lines = []
    for name, entry in entries(cfg).items():
        limits = []
        if "max_steps" in entry:
            limits.append(f"{int(entry['max_steps']):,} steps")
        if "max_time" in entry:
            limits.append(f"{seconds(entry['max_time']) / 60:.0f} min of training")
        budget = " or ".join(limits)
        extra = " ".join(f"--{k} {_value(v)}" for k, v in (entry.get("args") or {}).items())
        lines.append(
            f"- `{name}`: `{entry['config']}`{' ' + extra if extra else ''}; budget {budget}{', whichever first' if len(limits) > 1 else ''}"
        )
    return lines
