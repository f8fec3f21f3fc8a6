"""torch.compile for any method's networks, as a callback: ``--trainer.callbacks+=callbacks.CompileNetworks``."""

from __future__ import annotations

import difflib

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class CompileNetworks(Callback):
    """Compile the method's networks with ``torch.compile`` before training or sampling.

    Each network is compiled in place (``nn.Module.compile``), so its ``state_dict`` and the
    checkpoints keep their keys (no ``_orig_mod.`` prefix): a checkpoint of a compiled run loads
    into an eager model, and the other way round.

    Args:
        modules: attribute names of the networks to compile (``denoiser``, ``generator``,
            ``transformer``, ...); None: every direct child with trainable parameters.
        backend: ``inductor`` (generated kernels), or ``aot_eager`` / ``eager`` (capture only).
        mode: inductor's mode (``default``, ``reduce-overhead``, ``max-autotune``).
        dynamic: dynamic shapes (None: torch's default).
    """

    def __init__(self, modules: list[str] | None = None, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None):  # fmt: skip
        self.modules, self.backend, self.mode, self.dynamic = modules, backend, mode, dynamic
        self.compiled: list[str] = []

    def targets(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        children = dict(pl_module.named_children())
        if self.modules is None:
            return {n: m for n, m in children.items() if any(p.requires_grad for p in m.parameters())}
        unknown = [n for n in self.modules if not isinstance(children.get(n), nn.Module)]
        if unknown:
            hints = "".join(f" (did you mean {c[0]!r}?)" for n in unknown if (c := difflib.get_close_matches(n, children, 1)))
            raise ValueError(f"CompileNetworks: {type(pl_module).__name__} has no network {unknown}{hints}; "
                             f"its networks are {', '.join(children)}")  # fmt: skip
        return {n: children[n] for n in self.modules}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.compiled:
            return
        for name, module in self.targets(pl_module).items():
            module.compile(backend=self.backend, mode=self.mode, dynamic=self.dynamic)
            self.compiled.append(name)
        rank_zero_info(f"torch.compile ({self.backend}): {', '.join(self.compiled) or 'nothing'}")
