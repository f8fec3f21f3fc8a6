"""Activation checkpointing, and a count of the activation memory autograd keeps.

``checkpointed(enabled, module, fn, *args)`` runs ``fn(*args)`` under non-reentrant
``torch.utils.checkpoint`` when ``enabled`` and the module trains with gradients on: the
activations inside ``fn`` are recomputed in the backward pass instead of kept. Sampling (no
gradients) and evaluation run plainly.

``saved_activation_bytes()`` counts, as a context manager, the bytes of the distinct tensors that
autograd saves for the backward pass while it is open (parameters excluded): the activation
memory of a training step, measured the same way on every device, the meta device included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(enabled: bool, module: nn.Module, fn: Callable, *args, **kwargs):
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


class SavedBytes:
    """What ``saved_activation_bytes`` counted: ``bytes`` (distinct storages) and ``tensors``."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.bytes, self.tensors = exclude, set(), 0, 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.device.type, tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else id(tensor)
        if not (isinstance(tensor, nn.Parameter) or key in self.exclude or key in self.seen):
            self.seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes() if tensor.device.type != "meta" else tensor.numel() * tensor.element_size()
            self.tensors += 1
        return tensor


@contextmanager
def saved_activation_bytes(module: nn.Module | None = None) -> Iterator[SavedBytes]:
    """Count the activations autograd saves inside the block (``module``'s parameters and buffers
    excluded, as weights rather than activations)."""
    exclude = set()
    if module is not None:
        for t in [*module.parameters(), *module.buffers()]:
            exclude.add((t.device.type, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t))
    counter = SavedBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter
