"""Tear the process group down before Python does.

Lightning destroys an NCCL process group at exit but leaves a gloo one (CPU DDP) to the
interpreter's finalisation. Gloo's worker threads can then outlive the objects they hold, and
the process aborts (``terminate called without an active exception``, exit 134) after the
work is done: about one run in twelve of two CPU processes here, and a rank that aborts like
that can leave its peer waiting. ``destroy_at_exit`` registers the missing call.
"""

from __future__ import annotations

import atexit

import torch

_registered = False


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_at_exit() -> None:
    """Destroy the default process group (any backend) at exit, once; a no-op without one."""
    global _registered
    if not _registered:
        atexit.register(_destroy)
        _registered = True
