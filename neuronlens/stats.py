"""The statistics of a report: bootstrap confidence intervals, paired tests, judge agreement.

Intervals are percentile bootstrap 95% intervals from ``scipy.stats.bootstrap`` with 10,000
resamples and a fixed seed, so a report is reproducible to the digit. Paired intervals resample
neurons (the per-neuron differences), which is the paired bootstrap. Undefined quantities (too few
values, all differences zero, a constant input) are ``None``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

N_RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
METHOD = "percentile"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Summary:
    """Mean and median of one result's scores, each with its bootstrap interval."""

    n: int
    mean: float | None
    mean_ci: Interval | None
    median: float | None
    median_ci: Interval | None


@dataclass(frozen=True)
class Paired:
    """Scores of result A minus result B on the same neurons."""

    n: int
    mean_diff: float | None
    ci: Interval | None
    wilcoxon_p: float | None
    ttest_p: float | None


@dataclass(frozen=True)
class Difference:
    """Mean of sample A minus mean of sample B, on different units (not paired)."""

    n_a: int
    n_b: int
    mean_diff: float | None
    ci: Interval | None
    p: float | None   # Mann-Whitney U, two-sided


@dataclass(frozen=True)
class Agreement:
    n: int
    spearman: float | None
    p: float | None
    ci: Interval | None = None   # paired bootstrap over neurons


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, *,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval | None:
    """Percentile bootstrap interval of ``statistic`` (which takes ``axis=``); None below 2 values
    or when every value is the same (the interval would be a point)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2 or np.all(data == data[0]):
        return None
    res = stats.bootstrap((data,), statistic, n_resamples=n_resamples, confidence_level=LEVEL,
                          method=METHOD, random_state=np.random.default_rng(seed), vectorized=True)
    low, high = _finite(res.confidence_interval.low), _finite(res.confidence_interval.high)
    return None if low is None or high is None else Interval(low, high)


def summarise(values: Sequence[float]) -> Summary:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Summary(0, None, None, None, None)
    return Summary(int(data.size), float(np.mean(data)), bootstrap_ci(data, np.mean),
                   float(np.median(data)), bootstrap_ci(data, np.median))


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of a - b with a paired bootstrap interval, Wilcoxon signed-rank and paired t p-values."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"Paired samples must have the same length ({x.size} vs {y.size}).")
    diff = x - y
    if diff.size == 0:
        return Paired(0, None, None, None, None)
    wilcoxon_p = ttest_p = None
    if diff.size >= 2 and np.any(diff != 0):
        wilcoxon_p = _finite(stats.wilcoxon(x, y).pvalue)
        if np.any(diff != diff[0]):
            ttest_p = _finite(stats.ttest_rel(x, y).pvalue)
    return Paired(int(diff.size), float(np.mean(diff)), bootstrap_ci(diff, np.mean), wilcoxon_p, ttest_p)


def difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Mean of ``a`` minus mean of ``b`` for independent samples, with a bootstrap interval that
    resamples each sample on its own, and the Mann-Whitney U p-value."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return Difference(int(x.size), int(y.size), None, None, None)
    res = stats.bootstrap((x, y), lambda u, v, axis: np.mean(u, axis=axis) - np.mean(v, axis=axis),
                          n_resamples=N_RESAMPLES, confidence_level=LEVEL, method=METHOD,
                          random_state=np.random.default_rng(SEED), vectorized=True)
    low, high = _finite(res.confidence_interval.low), _finite(res.confidence_interval.high)
    return Difference(int(x.size), int(y.size), float(x.mean() - y.mean()),
                      None if low is None or high is None else Interval(low, high),
                      _finite(stats.mannwhitneyu(x, y).pvalue))


def agreement(a: Sequence[float], b: Sequence[float]) -> Agreement:
    """Spearman rank correlation between two judges' scores of the same explanations."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return Agreement(int(x.size), None, None)
    res = stats.spearmanr(x, y)
    return Agreement(int(x.size), _finite(res.statistic), _finite(res.pvalue), spearman_ci(x, y))


def spearman_ci(x: np.ndarray, y: np.ndarray) -> Interval | None:
    """Percentile bootstrap interval of Spearman's rho, resampling neurons (pairs); resamples in
    which either side is constant (rho undefined) are left out, and with fewer than half of them
    left there is no interval."""
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, x.size, size=(N_RESAMPLES, x.size))
    rx, ry = stats.rankdata(x[picks], axis=1), stats.rankdata(y[picks], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    norm = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    rho = (rx * ry).sum(1)[norm > 0] / norm[norm > 0]
    if rho.size < N_RESAMPLES / 2:
        return None
    low, high = np.percentile(rho, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return Interval(float(low), float(high))
