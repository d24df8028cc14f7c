"""Intervals against values computed by hand or known in closed form."""

import math

import numpy as np
import pytest

from train import stats


def test_wilson_matches_the_textbook_values():
    # 8 of 10: Wilson 95% interval 0.4902 .. 0.9433 (Newcombe 1998, table I style example).
    low, high = stats.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of n: low is exactly 0 and high = z^2 / (n + z^2).
    z = 1.959963984540054
    low, high = stats.wilson(0, 50)
    assert low == 0.0 and high == pytest.approx(z * z / (50 + z * z), rel=1e-9)
    # symmetric around 1/2 for k = n/2
    low, high = stats.wilson(50, 100)
    assert low + high == pytest.approx(1.0, abs=1e-12) and high - 0.5 == pytest.approx(
        z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000), rel=1e-9
    )


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, 0)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match=f"k={k}"):
        stats.wilson(k, n)


def test_bootstrap_interval_agrees_with_the_normal_approximation_for_large_n():
    x = np.r_[np.ones(200), np.zeros(200)]  # p = 0.5, n = 400: half width 1.96 * 0.025
    low, high = stats.bootstrap_interval(x)
    assert (high - low) / 2 == pytest.approx(1.96 * 0.025, rel=0.08)
    assert low < 0.5 < high


def test_paired_difference_uses_the_pairing():
    # Both pairings right on the same 60 examples and wrong on the same 40: the difference is
    # exactly 0 in every resample, though each accuracy alone is uncertain.
    a = np.r_[np.ones(60), np.zeros(40)]
    d = stats.paired_difference(a, a)
    assert d == {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 100}
    # b loses 10 of a's examples: b - a is a 0/-1 variable with p = 0.1, so the interval is
    # about -0.10 +- 1.96 * sqrt(0.1 * 0.9 / 100) = -0.10 +- 1.96 * 0.03.
    b = a.copy()
    b[:10] = 0
    d = stats.paired_difference(b, a)
    assert d["diff"] == pytest.approx(-0.10)
    assert (d["high"] - d["low"]) / 2 == pytest.approx(1.96 * 0.03, rel=0.15)
    assert d["high"] < 0  # significant, although the unpaired Wilson intervals overlap
    wa, wb = stats.wilson(60, 100), stats.wilson(50, 100)
    assert wb[1] > wa[0]
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference(a, a[:5])


def test_seed_interval_is_the_student_t_interval():
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3)
    low, high = stats.seed_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert stats.seed_interval([0.4]) == (0.4, 0.4)


def test_over_seeds_aggregates_seeds_and_examples():
    per_seed = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    got = stats.over_seeds(per_seed)
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["per_seed"] == [0.5, 0.25, 0.75]
    assert (got["seed_low"], got["seed_high"]) == pytest.approx(
        stats.seed_interval([0.5, 0.25, 0.75])
    )
    assert got["n"] == 4 and got["seeds"] == 3
    assert 0.0 <= got["low"] <= 0.5 <= got["high"] <= 1.0


def test_level_must_be_a_probability():
    with pytest.raises(ValueError, match="level=1.5"):
        stats.wilson(1, 2, level=1.5)
