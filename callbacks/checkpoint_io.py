"""Checkpoints that are whole or absent: written to a temporary file in the same folder, flushed
to disk and renamed into place, so a process killed mid-write (an OOM kill, a node failure,
SLURM's KILL after the grace period) leaves the previous checkpoint, never a truncated one."""

from __future__ import annotations

import os
import uuid
import zipfile

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` through ``<dir>/.<name>.<random>.tmp`` and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # the rename itself survives a power loss only once the folder is on disk too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic writes for local paths (``last``, best, HPC);
    remote paths (``s3://``, ...) are left to Lightning. ``train.py`` installs it on every trainer
    whose strategy uses the plain Torch checkpoint IO."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, str(path))


def use_atomic_checkpoint_io(strategy) -> bool:
    """Make ``strategy`` save through :class:`AtomicCheckpointIO` when it uses Lightning's plain
    Torch checkpoint IO, also inside a wrapper (``AsyncCheckpointIO``). A sharded strategy's own
    IO, or one the user chose, is left alone. Returns whether it now writes atomically."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    if isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        io._checkpoint_io = AtomicCheckpointIO()  # the wrapper's setter ignores a second inner IO
        return True
    return isinstance(io, AtomicCheckpointIO) or (
        isinstance(io, _WrappingCheckpointIO) and isinstance(io.checkpoint_io, AtomicCheckpointIO)
    )


def remove_partial_writes(folder: str) -> list[str]:
    """Remove the temporary files that writers killed mid-write left in ``folder``
    (``.<name>.<hex>.tmp``); returns what was removed."""
    import glob

    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), ".*.ckpt.*.tmp")):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint to resume or load from (truncated, empty, not one), or
    None. It reads only the archive's directory at the end of the file, not the tensors."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"is truncated or not a checkpoint ({size:,} bytes, no complete torch.save archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"is damaged ({err})"
    if not any(name.endswith("data.pkl") for name in names):
        return "is a zip archive but not a torch.save checkpoint"
    return None
