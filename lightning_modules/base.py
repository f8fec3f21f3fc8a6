"""What every LightningModule of the framework shares (per-rank random streams), and what every
text-to-image method shares on top: the ``generate`` contract, its options and ``predict``."""

from __future__ import annotations

import importlib
import inspect
import os
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from networks.errors import ConfigError, MissingFileError
from networks.noise import Generators, run_seed, seeded, stream_seed


def decay_groups(module: nn.Module, every_matrix: bool = False) -> list[dict]:
    """Parameter groups: weight decay on the weights of Linear layers only; biases, norms,
    embeddings and position tables without (minGPT, taming-transformers). With ``every_matrix``,
    open_clip's rule: every parameter of two or more dimensions decays (Linear and conv kernels,
    embeddings, position tables), none of the gains, biases or scalars (logit scale and bias)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if every_matrix:
        decay = {id(p) for p in params if p.ndim >= 2}
    else:
        decay = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    return [
        {"params": [p for p in params if id(p) in decay]},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]


class BaseModule(LightningModule):
    """Base of every LightningModule here (methods, autoencoders, CLIP).

    Randomness. LightningCLI seeds every DDP process with the same seed, so anything a training
    step draws from the global RNG (timesteps, noise, caption dropout, a GAN's ``z``, dropout
    masks) would be the same on every rank. At the start of training each rank reseeds torch,
    numpy and ``random`` with a seed made of the run's seed, its global rank and the global step
    it starts from: the ranks draw different numbers, a rerun with the same seed draws the same
    ones, and a resumed run continues on a stream of its own instead of replaying the first one.
    Subclasses that override ``on_train_start`` call ``super().on_train_start()``.
    """

    def check_datamodule(self, datamodule) -> None:
        """Called by the CLI before any work: a model with an ``image_size`` takes the data's."""
        size, mine = getattr(datamodule, "image_size", None), getattr(self, "image_size", None)
        if size is not None and mine is not None and size != mine:
            raise ConfigError(
                f"the data's image_size is {size} but {type(self).__name__} makes or encodes {mine} px images; "
                f"set the data's image_size (--data.init_args.image_size) and the model's to the same value"
            )

    def optimizer_with_scheduler(self, optimizer, scheduler_factory=None):
        """What ``configure_optimizers`` returns for one optimizer and an optional scheduler factory
        (stepped every training step)."""
        if scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"},
        }

    def configure_model(self) -> None:
        """Under ``FullyShardedStrategy`` (``lightning_modules/sharding.py``), shard the trainable
        networks and their EMA twins block by block; under any other strategy, nothing."""
        if getattr(self, "_device_mesh", None) is not None:
            from lightning_modules.sharding import shard_module

            shard_module(self, self._device_mesh["data_parallel"])

    def on_train_start(self) -> None:
        seed = stream_seed(run_seed(), "train", self.global_rank, self.global_step)
        torch.manual_seed(seed)  # every device's default generator
        random.seed(seed)
        np.random.seed(seed % 2**32)


class TextToImageModule(BaseModule):
    """Base of every text-to-image method.

    Subclasses implement ``generate(prompts, *, seed=None, <options>, **unknown) -> (b, 3, h, w)``
    in [-1, 1] and pass ``unknown`` to :meth:`check_sampling`, so every method answers an option
    it does not know with the same clear error. Callbacks, ``predict``, evaluation and
    comparisons use only ``generate``.

    ``seed`` is None (the global RNG), an int (one stream for the whole batch) or a list of ints,
    one per prompt: then each image depends only on its own prompt and seed, not on the batch
    it is generated in.
    """

    def generate(self, prompts: list[str], *, seed: int | list[int] | None = None, **sampling) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ options of generate
    def sampling_options(self) -> tuple[str, ...]:
        """Names of the keyword options ``generate`` accepts (besides ``seed``): the keyword-only
        parameters of ``generate`` in this class and the classes it extends."""
        names: list[str] = []
        for cls in type(self).__mro__:
            fn = cls.__dict__.get("generate")
            if fn is None:
                continue
            for name, p in inspect.signature(inspect.unwrap(fn)).parameters.items():
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed" and name not in names:
                    names.append(name)
        return tuple(names)

    def check_sampling(self, options: Mapping) -> None:
        """Raise a TypeError naming the options of ``generate`` if ``options`` has any other."""
        known = self.sampling_options()
        unknown = [k for k in options if k not in known]
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.generate does not take {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(known) or 'none'} (and seed)"
            )

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """A batch of prompt dicts (``caption``, ``seed``, ``index``) -> the batch plus ``image``.

        One ``generate`` call per batch; every prompt keeps its own seed, so its image is the one
        it gets when generated alone."""
        images = self.generate(list(batch["caption"]), seed=[int(s) for s in batch["seed"]])
        return {**batch, "image": images}

    @staticmethod
    def generator(seed: int | Sequence[int] | None, device: torch.device) -> Generators:
        """Generators on ``device`` for ``seed``: None, one for an int, one per sample for a list."""
        return seeded(seed, device)


def load_method(path: str, option: str, map_location: str | torch.device = "cpu",
                class_path: str | None = None) -> TextToImageModule:  # fmt: skip
    """Any text-to-image method from its checkpoint (the class the CLI recorded in it, or
    ``class_path`` for a checkpoint saved without the CLI), frozen and in eval mode, with no
    trainer: for reranking, guidance and evaluation."""
    if not path or not os.path.isfile(path):
        raise MissingFileError(
            f"{option}: checkpoint {path!r} not found: train the method first and give its "
            "checkpoints/last.ckpt or best-*.ckpt"
        )
    class_path = class_path or torch.load(path, map_location="cpu", weights_only=False).get(
        "hyper_parameters", {}
    ).get("_class_path")
    cls = None
    if class_path:
        module, _, name = str(class_path).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not issubclass(cls, TextToImageModule):
        raise ConfigError(
            f"{option}: {path!r} is not a text-to-image method's checkpoint "
            f"({class_path or 'no model class recorded'}): give one saved by train.py fit of a method "
            "(diffusion, GAN, VAE, token prior)"
        )
    model = cls.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return model.requires_grad_(False).eval()
