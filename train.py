"""Entry point: ``python train.py {fit,validate,test,predict} --config configs/...yaml``.

Each run gets its own directory ``<trainer.default_root_dir>/<run name>`` holding the
resolved ``config.yaml``, ``run.json`` (the model class and the ``--config`` files that made
it), ``checkpoints/`` (``last.ckpt`` and the best), ``samples/``, ``predictions/`` and the W&B
files. The run name is ``--run_name``, else the SLURM job id (stable across requeues), else a
timestamp. ``fit --ckpt_path last`` without a run name resumes the one run under the root that
was made by the same model class and the same ``--config`` files and has a ``last.ckpt``; with
none or several, it stops and lists the candidates.
"""

from __future__ import annotations

import glob
import json
import os
import time

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

RUN_NAME_ENV = "T2I_RUN_NAME"  # shared with the processes DDP launches, so all ranks agree
RUN_INFO = "run.json"  # what made a run: its model class and --config files


def _class_path(node) -> str:
    return str(getattr(node, "class_path", "") or "")


def run_identity(cfg) -> dict:
    """What identifies an experiment: the model class and the ``--config`` files (absolute paths)."""
    configs = [getattr(c, "absolute", None) or os.path.abspath(str(c)) for c in (cfg.get("config") or [])]
    return {"model": _class_path(cfg.get("model")), "configs": [os.path.realpath(str(c)) for c in configs]}


def find_run_to_resume(root: str, identity: dict) -> str:
    """The one run under ``root`` with a ``checkpoints/last.ckpt`` made by ``identity``."""
    runs = sorted(
        (
            os.path.dirname(os.path.dirname(p))
            for p in glob.glob(os.path.join(root, "*", "checkpoints", "last.ckpt"))
        ),
        key=lambda d: os.path.getmtime(os.path.join(d, "checkpoints", "last.ckpt")),
        reverse=True,
    )
    if not runs:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {root}/ has checkpoints/last.ckpt; leave out --ckpt_path to start a new run"
        )

    def info(run_dir: str) -> dict:
        try:
            with open(os.path.join(run_dir, RUN_INFO)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def describe(run_dir: str) -> str:
        i = info(run_dir)
        when = time.strftime(
            "%Y-%m-%d %H:%M",
            time.localtime(os.path.getmtime(os.path.join(run_dir, "checkpoints", "last.ckpt"))),
        )
        made = f"{i.get('model', '?').rsplit('.', 1)[-1]} from {', '.join(map(os.path.relpath, i.get('configs', []))) or '?'}"
        return f"  {os.path.basename(run_dir)}  (last.ckpt {when}; {made})"

    matches = [r for r in runs if info(r) == identity]
    if len(matches) == 1:
        return os.path.basename(matches[0])
    wanted = f"{identity['model'].rsplit('.', 1)[-1]} from {', '.join(map(os.path.relpath, identity['configs'])) or 'no --config'}"
    listed = "\n".join(describe(r) for r in (matches or runs))
    if matches:
        problem = f"{len(matches)} runs under {root}/ were made by this experiment ({wanted})"
    else:
        problem = f"no run under {root}/ was made by this experiment ({wanted}); the runs there are"
    raise ValueError(
        f"--ckpt_path last: {problem}:\n{listed}\n"
        "Pass --run_name NAME to resume one of them, or leave out --ckpt_path to start a new run."
    )


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config and ``run.json`` in the run directory and sends the config to
    the loggers (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.clone()
        if stage == "fit":  # called on rank zero only: no collective (trainer.log_dir broadcasts)
            with open(os.path.join(trainer.default_root_dir, RUN_INFO), "w") as f:
                json.dump(run_identity(config), f, indent=1)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config.as_dict()})


class TextToImageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="name of the run directory and the W&B run id"
        )

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        root = cfg.trainer.default_root_dir or "runs"
        name = cfg.get("run_name") or os.environ.get(RUN_NAME_ENV) or os.environ.get("SLURM_JOB_ID")
        if name is None and self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            name = find_run_to_resume(root, run_identity(cfg))
            cfg.ckpt_path = os.path.join(root, name, "checkpoints", "last.ckpt")
        if name is None:
            name = time.strftime("%Y%m%d-%H%M%S") + (
                "" if self.subcommand == "fit" else f"-{self.subcommand}"
            )
        os.environ[RUN_NAME_ENV] = name
        run_dir = os.path.join(root, name)
        cfg.trainer.default_root_dir = run_dir
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for logger in loggers:
            if "Wandb" in _class_path(logger):
                logger.init_args.save_dir = run_dir
                logger.init_args.version = logger.init_args.get("version") or name.replace("/", "-")
            elif _class_path(logger):
                logger.init_args.save_dir = run_dir
        for callback in cfg.trainer.callbacks or []:
            if _class_path(callback).endswith("ModelCheckpoint") and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = os.path.join(run_dir, "checkpoints")


def main() -> None:
    TextToImageCLI(
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
