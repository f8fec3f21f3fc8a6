"""Seeded noise for sampling, per batch or per sample, and seeds for independent random streams.

A *generators* value is ``None`` (the global RNG), one ``torch.Generator`` for the whole batch,
or a list of generators, one per sample. With a list, row ``i`` of every draw comes from
generator ``i`` alone, so a sample's noise, and the image made from it, does not depend on
which other samples share its batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device=None, dtype=None) -> Tensor:
    """Standard normal noise of ``shape`` (``shape[0]`` is the batch)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def _draw(fn, shape: Sequence[int], generator: Generators, device, dtype) -> Tensor:
    """``fn(shape)`` (``torch.randn``, ``torch.rand``) from ``generator``; with one generator per
    sample, row ``i`` is drawn by generator ``i`` alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([fn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return fn(tuple(shape), generator=generator, device=device, dtype=dtype)


def seeded(seed: int | Sequence[int] | None, device: torch.device | str = "cpu") -> Generators:
    """Generators for ``seed``: None for None, one generator for an int, one per sample for a list."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    return torch.Generator(device=device).manual_seed(int(seed))


def offset(seed: int | Sequence[int] | None, delta: int) -> int | list[int] | None:
    """``seed + delta`` for an int or every element of a list (a second, independent stream)."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        return [int(s) + delta for s in seed]
    return int(seed) + delta


def stream_seed(*parts) -> int:
    """A 63-bit seed made from ``parts`` (run seed, rank, worker, step, ...): equal parts give
    equal seeds, and parts that differ in any place give unrelated ones."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def run_seed() -> int:
    """The run's seed, as ``seed_everything`` (LightningCLI's ``--seed_everything``) set it; 0 if unset."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rand(shape: Sequence[int], generator: Generators, device=None, dtype=None) -> Tensor:
    """Uniform noise in [0, 1) of ``shape`` (``shape[0]`` is the batch), seeded like :func:`randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)
