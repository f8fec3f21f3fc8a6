"""Entry point: ``python train.py {fit,validate,test,predict} --config configs/...yaml``.

Each run gets its own directory ``<trainer.default_root_dir>/<run name>`` holding the
resolved ``config.yaml``, ``checkpoints/`` (``last.ckpt`` and the best), ``samples/``,
``predictions/`` and the W&B files. The run name is ``--run_name``, else the SLURM job id
(stable across requeues), else a timestamp. ``fit --ckpt_path last`` without a run name
resumes the newest run under the root that has a ``last.ckpt``.
"""

from __future__ import annotations

import glob
import os
import time

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

RUN_NAME_ENV = "T2I_RUN_NAME"  # shared with the processes DDP launches, so all ranks agree


def _class_path(node) -> str:
    return str(getattr(node, "class_path", "") or "")


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config in the run directory and sends it to the loggers (W&B)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.clone()
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
            candidates = sorted(
                glob.glob(os.path.join(root, "*", "checkpoints", "last.ckpt")), key=os.path.getmtime
            )
            if not candidates:
                raise FileNotFoundError(f"--ckpt_path last: no run under {root} has checkpoints/last.ckpt")
            name = os.path.basename(os.path.dirname(os.path.dirname(candidates[-1])))
            cfg.ckpt_path = candidates[-1]
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
