"""Entry point: ``python train.py {fit,validate,test,predict} --config configs/...yaml``.

Each run gets its own directory ``<trainer.default_root_dir>/<run name>`` holding the
resolved ``config.yaml``, ``run.json`` (the model class and the ``--config`` files that made
it), ``checkpoints/`` (``last.ckpt`` and the best), ``samples/``, ``predictions/`` and the W&B
files. The run name is ``--run_name``, else the SLURM job id (``<array job>_<task>`` for an
array task; stable across requeues), else a timestamp. A SLURM-managed ``fit`` (``srun`` in a
batch job, ``callbacks/slurm.py``) checks its allocation first and resumes from the newest HPC
checkpoint of its run directory, written when SLURM signalled pre-emption or the time limit. ``fit --ckpt_path last`` without a run name resumes the one run under the root that
was made by the same model class and the same ``--config`` files and has a ``last.ckpt``; with
none or several, it stops and lists the candidates.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.checkpoint_io import checkpoint_problem, use_atomic_checkpoint_io
from callbacks.dashboard import Throughput, experiment_group, run_tags
from callbacks.process_group import destroy_at_exit
from callbacks.progress import ProgressLog
from callbacks.slurm import (
    SharedRunDirCheck,
    SlurmRequeue,
    check_allocation,
    link_job_log,
    newest_hpc_checkpoint,
    slurm_managed,
    slurm_run_name,
    start_rendezvous_watchdog,
)
from callbacks.stopping import SaveLastCheckpoint
from callbacks.timer import TrainingTimer
from networks.errors import ConfigError

RUN_DIR_ENV = "T2I_RUN_DIR"  # shared with the processes DDP launches, so all ranks agree
RUN_INFO = "run.json"  # what made a run: its model class and --config files


def _class_path(node) -> str:
    return str(getattr(node, "class_path", "") or "")


def run_identity(cfg) -> dict:
    """What identifies an experiment: the model class and the ``--config`` files (absolute paths)."""
    configs = [getattr(c, "absolute", None) or os.path.abspath(str(c)) for c in (cfg.get("config") or [])]
    return {"model": _class_path(cfg.get("model")), "configs": [os.path.realpath(str(c)) for c in configs]}


def _same_experiment(info: dict, identity: dict) -> bool:
    return all(info.get(k) == v for k, v in identity.items())


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

    matches = [r for r in runs if _same_experiment(info(r), identity)]
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
    """For ``fit``: saves the resolved config and ``run.json`` in the run directory and sends the
    config to the loggers (W&B). Other subcommands leave the run's files as they are."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.clone()
        # called on rank zero only: no collective here (trainer.log_dir would broadcast)
        with open(os.path.join(trainer.default_root_dir, RUN_INFO), "w") as f:
            json.dump({**run_identity(config), "command": sys.argv}, f, indent=1)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config.as_dict()})


def check_train_time(value: str, max_time) -> None:
    """``--max_train_time``: a DD:HH:MM:SS string, and not given together with a ``max_time``."""
    if not re.fullmatch(r"\d+:\d{2}:\d{2}:\d{2}", str(value)):
        raise SetupError(f"--max_train_time {value!r} is not DD:HH:MM:SS (e.g. 00:00:20:00)")
    if max_time is not None:
        raise SetupError(
            f"--max_train_time {value} and --trainer.max_time {max_time} are both set: give one (max_train_time "
            "counts training alone, max_time counts the validations inside fit too), or --trainer.max_time null"
        )


class SetupError(Exception):
    """A mistake in the command or the config, found before any work: reported in one line."""


def run_of_checkpoint(path: str | None) -> str | None:
    """``<root>/<run>`` for a checkpoint at ``<root>/<run>/checkpoints/<file>.ckpt``, else None."""
    if not path or path in ("last", "best", "hpc", "registry") or not os.path.isfile(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def check_checkpoint(path: str | None) -> None:
    """A missing, truncated or foreign ``--ckpt_path`` file stops the command in one line."""
    if not path or path in ("last", "best", "hpc") or path.startswith("registry"):
        return
    if not os.path.isfile(path):
        runs = sorted(glob.glob(os.path.join("runs", "*", "checkpoints", "*.ckpt")))
        hint = f" (for example {runs[-1]})" if runs else ""
        raise SetupError(
            f"--ckpt_path {path}: no such file; give a checkpoint file{hint}, or 'last' with fit to resume"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise SetupError(
            f"--ckpt_path {path} {problem}; give an earlier checkpoint of the run "
            f"(its folder: {os.path.dirname(path) or '.'}), or leave out --ckpt_path to start a new run"
        )


def last_checkpoint_file(cfg, run_dir: str) -> str:
    """Where a ``fit`` in ``run_dir`` writes ``last.ckpt``: its ModelCheckpoint folder, by default
    ``<run>/checkpoints``."""
    for callback in cfg.trainer.callbacks or []:
        if _class_path(callback).endswith("ModelCheckpoint") and callback.init_args.get("dirpath"):
            return os.path.join(str(callback.init_args.dirpath), "last.ckpt")
    return os.path.join(run_dir, "checkpoints", "last.ckpt")


def _option_names(cls_path: str) -> list[str]:
    """The constructor arguments of the class at ``cls_path`` and the classes it extends."""
    import importlib
    import inspect

    module, _, name = cls_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
    return names


def explain_parse_error(message: str, known_options: list[str]) -> str:
    """A parse error in one line, with "did you mean" for misspelt options."""
    import difflib
    import re

    unknown = re.search(r"unrecognized arguments: (.*)", message)
    if unknown:
        parts = []
        for option in (a.split("=", 1)[0] for a in unknown.group(1).split() if a.startswith("--")):
            close = difflib.get_close_matches(option, known_options, n=1, cutoff=0.75)
            parts.append(f"{option}" + (f" (did you mean {close[0]}?)" if close else ""))
        if parts:
            return f"unknown option {', '.join(parts)}"
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    if group:
        prefix = f"--{group.group(1)}."
        names = [o[len(prefix) :] for o in known_options if o.startswith(prefix)]
        close = difflib.get_close_matches(group.group(2), names, n=1, cutoff=0.6)
        hint = f"; did you mean {group.group(1)}.{close[0]}?" if close else ""
        return f"{group.group(1)}.{group.group(2)} is not an option{hint}"
    rejected = re.findall(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message)
    if rejected:
        cls_path, option = rejected[-1]  # the innermost class
        close = difflib.get_close_matches(option, _option_names(cls_path), n=1, cutoff=0.6)
        hint = (
            f"; did you mean {close[0]}?" if close else f"; its options: {', '.join(_option_names(cls_path))}"
        )
        return f"{option!r} is not an option of {cls_path}{hint}"
    return message.strip()


class Parser(LightningArgumentParser):
    """LightningCLI's parser without abbreviated options (``--trainer.max_step`` is not
    ``--trainer.max_steps``) and with parse errors in one line, with suggestions."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        parsers = [parser, *getattr(getattr(parser, "_subcommands_action", None), "choices", {}).values()]
        known = [o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--")]
        sys.stderr.write(f"error: {explain_parse_error(message, known)}\n"
                         f"tip: {parser.prog.replace(' [options]', '')} --help lists every option\n")  # fmt: skip
        sys.exit(2)


def _flat_options(node, prefix: str = "") -> dict:
    """A config node (Namespace or dict) as ``{"init_args.x.init_args.y": value}``."""
    if node is None:
        return {}
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out = {}
    for key, value in node.items():
        out.update(_flat_options(value, f"{prefix}{key}."))
    return out


class TextToImageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="name of the run directory and the W&B run id"
        )
        parser.add_argument(
            "--max_train_time", type=str | None, default=None,
            help="fit: stop after this much training, DD:HH:MM:SS, not counting the validations inside it "
            "(--trainer.max_time counts them); the budget of the compare configs' runs",
        )  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model options by the checkpoint's hyperparameters when
        ``--ckpt_path`` is given; say which options given on the command line or in the configs
        that drops, instead of dropping them silently."""
        sub = self.config.get("subcommand")
        check_checkpoint(self.config[sub].get("ckpt_path") if sub else None)  # before Lightning unpickles it
        model = self.config[sub].get("model") if sub else None
        before = _flat_options(model.clone() if model is not None else None)
        super()._parse_ckpt_path()
        after = _flat_options(self.config[sub].get("model") if sub else None)
        replaced = [f"{k} {before[k]!r} -> {after[k]!r}" for k in before if k in after and before[k] != after[k]]
        if replaced:
            sys.stderr.write(
                "warning: --ckpt_path: the checkpoint's model options replace these given options: "
                + "; ".join(replaced)
                + " (to change a model option from a checkpoint, edit hyper_parameters in a copy of it)\n"
            )

    def choose_run_dir(self, cfg) -> str:
        root = cfg.trainer.default_root_dir or "runs"
        name = cfg.get("run_name") or slurm_run_name()
        if name is None and self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            try:
                name = find_run_to_resume(root, run_identity(cfg))
            except (FileNotFoundError, ValueError) as err:
                raise SetupError(str(err)) from err
            cfg.ckpt_path = os.path.join(root, name, "checkpoints", "last.ckpt")
        checkpoint_run = run_of_checkpoint(cfg.get("ckpt_path"))
        if name is None and self.subcommand != "fit" and checkpoint_run:
            return checkpoint_run  # predictions go beside the checkpoint's run
        if name is None:
            name = time.strftime("%Y%m%d-%H%M%S") + (
                "" if self.subcommand == "fit" else f"-{self.subcommand}"
            )
        return os.path.join(root, name)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        cfg = self.config[self.subcommand]
        # the config as the user wrote it, saved as <run>/config.yaml: reusable for predict or a
        # new run, with no paths of this run baked in (its run directory, resume checkpoint, ...)
        self.config_to_save = cfg.clone()
        self.config_to_save.ckpt_path, self.config_to_save.run_name = None, None
        run_dir = os.environ.get(RUN_DIR_ENV) or self.choose_run_dir(cfg)
        os.environ[RUN_DIR_ENV] = run_dir
        if slurm_managed() and self.subcommand == "fit":
            problems = check_allocation(cfg.trainer.num_nodes or 1, cfg.trainer.devices)
            if problems:
                raise SetupError("; ".join(problems))
            if os.environ.get("SLURM_PROCID", "0") == "0":
                link_job_log(run_dir)
            hpc = newest_hpc_checkpoint(run_dir)
            if hpc is not None:  # a requeued attempt: the state at the signal, before last.ckpt
                sys.stderr.write(f"SLURM: resuming {run_dir} from {os.path.basename(hpc)}\n")
                cfg.ckpt_path = hpc
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            last = last_checkpoint_file(cfg, run_dir)
            if not os.path.isfile(last):
                raise SetupError(
                    f"--ckpt_path last: nothing to resume in {run_dir}/ (no {os.path.relpath(last, run_dir)}); "
                    "leave out --ckpt_path to start a new run"
                )
            cfg.ckpt_path = last  # the file itself: Lightning's own lookup would only warn when it finds none
        check_checkpoint(cfg.get("ckpt_path"))  # a resolved 'last' or HPC checkpoint: whole?
        if cfg.get("max_train_time") is not None:
            check_train_time(cfg.max_train_time, cfg.trainer.get("max_time"))
        name = os.path.basename(run_dir)
        cfg.trainer.default_root_dir = run_dir
        if self.subcommand == "predict":
            cfg.trainer.logger = False  # nothing to log: images go to <run>/predictions
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for logger in loggers:
            if "Wandb" in _class_path(logger):
                logger.init_args.save_dir = run_dir
                logger.init_args.version = logger.init_args.get("version") or name.replace("/", "-")
                identity = run_identity(cfg)  # tags for the family and method, a group per experiment
                logger.init_args.tags = sorted({*(logger.init_args.get("tags") or []), *run_tags(identity["model"])})
                logger.init_args.group = logger.init_args.get("group") or experiment_group(identity["configs"])
            elif _class_path(logger):
                logger.init_args.save_dir = run_dir
        for callback in cfg.trainer.callbacks or []:
            if _class_path(callback).endswith("ModelCheckpoint") and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = os.path.join(run_dir, "checkpoints")

    def instantiate_trainer(self, **kwargs):
        plugins = self.config_init[self.subcommand]["trainer"].get("plugins") if self.subcommand else None
        if slurm_managed() and not plugins:
            from lightning.pytorch.plugins.environments import SLURMEnvironment

            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]  # SlurmRequeue does it at a step boundary
        elif "SLURM_NTASKS" in os.environ and not plugins:  # started by hand inside an allocation
            from lightning.pytorch.plugins.environments import LightningEnvironment

            kwargs["plugins"] = [LightningEnvironment()]
            sys.stderr.write(
                "SLURM: not started by srun in a batch job, so this is a plain local run (SLURM's task "
                "variables are ignored); set T2I_SLURM=1 to treat it as a SLURM run\n"
            )
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        budget = self.config[self.subcommand].get("max_train_time") if self.subcommand == "fit" else None
        if budget is not None:  # training time alone (Lightning's max_time counts validation too)
            trainer.callbacks.append(TrainingTimer(budget))
        if self.subcommand == "fit" and trainer.checkpoint_callbacks:  # (none: checkpointing is off)
            for callback in trainer.checkpoint_callbacks:  # Lightning's default one writes into a logger's
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:  # folder: use the run's
                    callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if not any(isinstance(c, SaveLastCheckpoint) for c in trainer.callbacks):
                trainer.callbacks.append(SaveLastCheckpoint())  # every fit ends with a resumable last.ckpt
        if self.subcommand == "fit" and any(isinstance(c, ProgressLog) and c.writes_lines() for c in trainer.callbacks):
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)]
        if slurm_managed() and self.subcommand == "fit":
            trainer.callbacks[:0] = [SlurmRequeue(), SharedRunDirCheck(start_rendezvous_watchdog())]
        if self.subcommand == "fit" and trainer.loggers and not any(isinstance(c, Throughput) for c in trainer.callbacks):
            trainer.callbacks.append(Throughput())  # perf/ on every dashboard
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and hasattr(self, "config_to_save"):
                callback.config = self.config_to_save
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # a setting the networks or the method cannot work with
            cause = err
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__ or cause.__context__  # jsonargparse wraps nested classes' errors
            if cause is None:
                raise
            raise SetupError(str(cause)) from err

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand not in ("fit", "validate", "test"):
            return
        check = getattr(self.datamodule, "check_sources", None)
        if check is not None:
            try:  # a wrong shard path fails here, before a run folder or a W&B run exists
                check("fit" if self.subcommand == "fit" else "validate")
            except (FileNotFoundError, ValueError) as err:
                raise SetupError(str(err)) from err
        check_data = getattr(self.model, "check_datamodule", None)
        if check_data is not None and self.datamodule is not None:
            try:  # e.g. an image size the model cannot encode
                check_data(self.datamodule)
            except ConfigError as err:
                raise SetupError(str(err)) from err


def main() -> None:
    destroy_at_exit()  # CPU DDP (gloo): otherwise an exit after finished work can abort
    try:
        TextToImageCLI(
            parser_class=Parser,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
        )
    except SetupError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
