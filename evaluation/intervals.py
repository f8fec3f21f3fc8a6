"""Prompt-level bootstrap intervals for rates measured on prompts x seeds.

A rate's uncertainty comes mostly from which prompts were drawn, so the bootstrap resamples
prompts (with replacement) and keeps each prompt's seeds together. Two methods scored on the same
prompts and seeds are compared by the interval of their paired difference, which is narrower than
the two separate intervals suggest when the methods fail on the same prompts.
"""

from __future__ import annotations

import numpy as np


def _per_prompt(hits) -> np.ndarray:
    """``hits``: (prompts, seeds) or (prompts,) of 0/1 (or scores) -> the mean per prompt."""
    a = np.asarray(hits, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"need (prompts, seeds) scores for at least 2 prompts, got shape {a.shape}")
    return a.mean(axis=1)


def bootstrap_interval(hits, level: float = 0.95, draws: int = 4000, seed: int = 0,
                       exact_at_edges: bool = True) -> tuple[float, float, float]:  # fmt: skip
    """The mean of ``hits`` (prompts, seeds) and its percentile-bootstrap interval over prompts;
    when every prompt's rate is 0 (or every one is 1), where the bootstrap has nothing to resample,
    the exact binomial bound over the prompts: [0, 1 - (tail)^(1/n)] (or [(tail)^(1/n), 1])."""
    per_prompt = _per_prompt(hits)
    n, tail = len(per_prompt), (1 - level) / 2
    if exact_at_edges and (np.all(per_prompt == 0) or np.all(per_prompt == 1)):  # every resample is the same: no interval at all;
        edge = tail ** (1 / n)  # the exact (Clopper-Pearson) bound with the n prompts as the units instead
        return (0.0, 0.0, float(1 - edge)) if per_prompt[0] == 0 else (1.0, float(edge), 1.0)
    rng = np.random.default_rng(seed)
    means = per_prompt[rng.integers(0, n, (draws, n))].mean(axis=1)
    lo, hi = np.percentile(means, [tail * 100, 100 - tail * 100])
    return float(per_prompt.mean()), float(lo), float(hi)


def paired_difference(a, b, level: float = 0.95, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` for two methods scored on the same prompts and seeds, with the
    bootstrap interval of the difference (the same prompts drawn for both)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same prompts and seeds: shapes {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, level, draws, seed, exact_at_edges=False)  # 0 differences: [0, 0]


def bootstrap_mean_of_sets(sets, level: float = 0.95, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """The mean over several prompt sets of each set's rate (``sets``: one (prompts, seeds) array
    per set), with a bootstrap interval that resamples each set's prompts on its own."""
    per_set = [_per_prompt(s) for s in sets]
    rng = np.random.default_rng(seed)
    means = np.mean([p[rng.integers(0, len(p), (draws, len(p)))].mean(axis=1) for p in per_set], axis=0)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(np.mean([p.mean() for p in per_set])), float(lo), float(hi)


def format_interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
