"""Intervals for accuracies measured on a finite test set and a few training seeds.

* ``wilson``: the Wilson score interval of a binomial proportion (one cell: k of n correct).
* ``bootstrap_interval``: the percentile bootstrap over examples of a mean.
* ``paired_difference``: the difference of two pairings' accuracies on the *same* examples, with
  a paired percentile bootstrap (the examples are resampled once for both), so the variance that
  comes from which examples are easy cancels.
* ``seed_interval``: the Student-t interval of the mean of per-seed values (the variance that
  comes from training: batch order).

All intervals are two-sided at ``level`` (default 0.95) and returned as ``(low, high)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

N_BOOT = 10_000


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"{level=} must be in (0, 1)")
    return level


def _z(level: float) -> float:
    return float(_st.norm.ppf(0.5 + _check_level(level) / 2))


def wilson(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got {k=} {n=}")
    z = _z(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _values(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence, got shape {a.shape}")
    return a


def bootstrap_interval(
    x: Sequence[float], *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(x)``, resampling the entries of ``x``."""
    a = _values(x, "x")
    _check_level(level)
    idx = np.random.default_rng(seed).integers(0, a.size, (n_boot, a.size))
    means = a[idx].mean(axis=1)
    q = (1 - level) / 2
    return float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """``mean(a) - mean(b)`` over the same examples (``a[i]``, ``b[i]`` are one example's
    results under two pairings) with its paired percentile-bootstrap interval:
    ``{"diff", "low", "high", "n"}``."""
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired results need equal lengths, got {x.size} and {y.size}")
    low, high = bootstrap_interval(x - y, level=level, n_boot=n_boot, seed=seed)
    return {"diff": float(x.mean() - y.mean()), "low": low, "high": high, "n": int(x.size)}


def seed_interval(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values (degenerate for one seed)."""
    a = _values(values, "values")
    _check_level(level)
    mean = float(a.mean())
    if a.size == 1:
        return mean, mean
    half = float(_st.t.ppf(0.5 + level / 2, a.size - 1)) * float(a.std(ddof=1)) / math.sqrt(a.size)
    return mean - half, mean + half


def cell(correct: Sequence[bool], *, level: float = 0.95) -> dict:
    """One report cell: ``{"accuracy", "low", "high", "n"}`` with the Wilson interval."""
    c = _values(correct, "correct")
    k = int(c.sum())
    low, high = wilson(k, c.size, level=level)
    return {"accuracy": k / c.size, "low": low, "high": high, "n": int(c.size)}


def over_seeds(per_seed: Sequence[Sequence[bool]], *, level: float = 0.95) -> dict:
    """A cell over several training seeds evaluated on the same examples
    (``per_seed[s][i]``: seed s, example i): the mean accuracy, the Student-t interval over the
    seeds' accuracies (``seed_low``/``seed_high``) and the bootstrap interval over examples of
    the per-example mean over seeds (``low``/``high``)."""
    m = np.asarray(per_seed, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"per_seed must be seeds x examples, got shape {m.shape}")
    accs = m.mean(axis=1)
    seed_low, seed_high = seed_interval(accs, level=level)
    low, high = bootstrap_interval(m.mean(axis=0), level=level)
    return {
        "accuracy": float(accs.mean()),
        "per_seed": [float(v) for v in accs],
        "low": low,
        "high": high,
        "seed_low": seed_low,
        "seed_high": seed_high,
        "n": int(m.shape[1]),
        "seeds": int(m.shape[0]),
    }
