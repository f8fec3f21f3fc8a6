"""Prompt-level bootstrap intervals: they cover the true rate as often as they claim, keep a
prompt's seeds together, and a paired difference sees what two separate intervals miss."""

import numpy as np
import pytest

from evaluation.intervals import bootstrap_interval, paired_difference


def test_the_interval_covers_the_true_rate_about_95_percent_of_the_time():
    """A simulated generator: each prompt has its own difficulty p_i (the true rate is their mean
    over the population of prompts), each seed a Bernoulli(p_i) hit."""
    rng = np.random.default_rng(0)
    true_rate, covered, runs = 0.6, 0, 300
    for r in range(runs):
        p = rng.beta(3 * true_rate, 3 * (1 - true_rate), size=40)
        hits = rng.random((40, 4)) < p[:, None]
        _, lo, hi = bootstrap_interval(hits, draws=1000, seed=r)
        covered += lo <= true_rate <= hi
    assert 0.88 <= covered / runs <= 0.99, covered / runs


def test_seeds_of_a_prompt_stay_together():
    """Prompts that always or never succeed: 4 seeds of each add no information, so the interval is
    as wide as with one seed per prompt (resampling images would make it half as wide)."""
    one = np.array([1, 0] * 10)
    mean1, lo1, hi1 = bootstrap_interval(one)
    mean4, lo4, hi4 = bootstrap_interval(np.repeat(one[:, None], 4, axis=1))
    assert mean1 == mean4 == 0.5 and (lo1, hi1) == (lo4, hi4) and hi1 - lo1 > 0.3


def test_a_paired_difference_is_narrower_when_methods_fail_on_the_same_prompts():
    rng = np.random.default_rng(1)
    hard = rng.random(60) < 0.5  # both methods fail the hard prompts; b also fails 6 easy ones
    a = (~hard).astype(float)
    b = a.copy()
    b[np.flatnonzero(~hard)[:6]] = 0
    diff, lo, hi = paired_difference(a, b)
    assert diff == pytest.approx(6 / 60) and lo > 0  # the paired interval says a is better
    _, a_lo, _ = bootstrap_interval(a)
    _, _, b_hi = bootstrap_interval(b)
    assert a_lo < b_hi  # while the separate intervals overlap
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(a, b[:-1])


def test_the_mean_of_sets_resamples_each_set_on_its_own():
    from evaluation.intervals import bootstrap_mean_of_sets

    always, never = np.ones((10, 2)), np.zeros((30, 2))
    assert bootstrap_mean_of_sets([always, never]) == (0.5, 0.5, 0.5)  # no spread within either set
    mixed = np.array([1, 0] * 10)
    mean, lo, hi = bootstrap_mean_of_sets([mixed, always])
    _, mlo, mhi = bootstrap_interval(mixed)
    assert mean == 0.75 and lo == pytest.approx((mlo + 1) / 2, abs=0.02) and hi == pytest.approx((mhi + 1) / 2, abs=0.02)


def test_a_rate_of_zero_or_one_gets_the_exact_bound_over_prompts_not_a_zero_width_interval():
    zeros, ones = np.zeros((32, 4)), np.ones((108, 4))
    assert bootstrap_interval(zeros) == (0.0, 0.0, pytest.approx(1 - 0.025 ** (1 / 32)))  # 0.109: 32 prompts
    mean, lo, hi = bootstrap_interval(ones)
    assert (mean, hi) == (1.0, 1.0) and lo == pytest.approx(0.025 ** (1 / 108)) and 0.96 < lo < 0.97
    assert paired_difference(zeros, zeros) == (0.0, 0.0, 0.0)  # no difference at all: no interval around it
