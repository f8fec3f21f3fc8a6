"""Building and loading models for the benchmarks (any method, from a config or a checkpoint)."""

from __future__ import annotations

import torch
import yaml


def build_model(model_cfg: dict, overrides: dict | None = None):
    """Instantiate a ``model:`` section (``class_path`` + ``init_args``) as the CLI would."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    if overrides:
        model_cfg = {**model_cfg, "init_args": {**model_cfg.get("init_args", {}), **overrides}}
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningModule, "model")
    return parser.instantiate_classes(parser.parse_object({"model": model_cfg})).model


def model_section(config: str) -> dict:
    with open(config) as f:
        return yaml.safe_load(f)["model"]


def from_run_config(config: str, path: str):
    """Build the model of a run from its saved ``config.yaml`` and load the checkpoint's weights."""
    model = build_model(model_section(config))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    return model.eval()


def load(path: str):
    """Any method's checkpoint trained through the CLI (its class comes from its hyperparameters)."""
    from lightning.pytorch import LightningModule

    import lightning_modules.cvae  # noqa: F401  (checkpoints may only name imported classes)
    import lightning_modules.diffusion  # noqa: F401
    import lightning_modules.gan  # noqa: F401
    import lightning_modules.priors  # noqa: F401

    return LightningModule.load_from_checkpoint(path, map_location="cpu", weights_only=False).eval()
