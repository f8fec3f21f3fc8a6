"""Frozen networks that are loaded from a local path stay out of checkpoints.

A pretrained text encoder (hundreds of MB for T5), or a frozen autoencoder or CLIP that a method
builds on, is rebuilt from its path whenever the method is constructed. Storing its weights again
in every checkpoint only costs disk and time. ``keep_out_of_checkpoints(module)`` drops the
module's entries from any state dict that contains it and, when such a state dict is loaded,
fills them back from the module itself (which already holds the weights read from its path).
"""

from __future__ import annotations

from torch import nn


def keep_out_of_checkpoints(module: nn.Module) -> nn.Module:
    """Leave ``module``'s weights out of every state dict that contains it; returns ``module``."""
    module.register_state_dict_post_hook(_drop_own_entries)
    module.register_load_state_dict_pre_hook(_fill_own_entries)
    return module


def _drop_own_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _own_entries(module: nn.Module, prefix: str) -> dict:
    """The entries ``module.state_dict(prefix=prefix)`` would have without the drop hook."""
    entries = {prefix + name: p for name, p in module._parameters.items() if p is not None} | {
        prefix + name: b
        for name, b in module._buffers.items()
        if b is not None and name not in module._non_persistent_buffers_set
    }
    for name, child in module.named_children():
        entries.update(child.state_dict(prefix=f"{prefix}{name}.", keep_vars=True))
    return entries


def _fill_own_entries(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for key, value in _own_entries(module, prefix).items():
        state_dict.setdefault(key, value.detach())
