"""Means with bootstrap confidence intervals, and paired differences (same condition and seed)."""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap


def mean_ci(x, n_resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) over the finite values of ``x``; NaNs where there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(x) == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0]), float(x[0])
    res = bootstrap(
        (x,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_diff_ci(a, b, n_resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the pairs where both are finite, with its bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return mean_ci(a - b, n_resamples, seed)
