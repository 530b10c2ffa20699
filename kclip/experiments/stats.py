"""Paired statistics over seeds and over validation images: t-intervals of paired differences and the paired
image bootstrap of a rate metric."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy)."""
    from scipy.stats import t
    return float(t.ppf(p, df))


def paired_differences(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict:
    """Per-seed differences x - y (paired by position) with their mean, sample std and t-interval.

    Returns:
        {"per_seed", "mean", "std" (ddof=1), "n", "ci": [lo, hi] or None (n < 2)}; pairs with a missing side
        are left out (and not counted).
    """
    d = [float(a) - float(b) for a, b in zip(x, y)
         if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    n = len(d)
    if n == 0:
        return {"per_seed": [], "mean": None, "std": None, "n": 0, "ci": None}
    mean = sum(d) / n
    if n < 2:
        return {"per_seed": d, "mean": mean, "std": None, "n": 1, "ci": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"per_seed": d, "mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def ratio_metric(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 x the mean over components of sum(num) / sum(den) over images.

    Shapes: num, den (..., Ni, C) -> (...). A metric that is one rate over images (R@K, top-1) has C = 1;
    the hard-negative mean has one component per group.
    """
    return 100.0 * (num.sum(-2) / den.sum(-2)).mean(-1)


def paired_bootstrap(num_x: np.ndarray, den_x: np.ndarray, num_y: np.ndarray, den_y: np.ndarray,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of the seed-mean difference metric(x) - metric(y) under resampling of images.

    The same resampled images serve every seed and both arms (the validation set is shared).

    Shapes: num_*, den_* (S, Ni, C): per seed, image and component, the hits and the counts.

    Returns:
        {"mean": the observed seed-mean difference, "ci": [lo, hi], "resamples"}.
    """
    observed = float((ratio_metric(num_x, den_x) - ratio_metric(num_y, den_y)).mean())
    ni = num_x.shape[1]
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, ni, ni)                                          # (Ni,) images drawn with replacement
        diffs[b] = (ratio_metric(num_x[:, idx], den_x[:, idx]) - ratio_metric(num_y[:, idx], den_y[:, idx])).mean()
    a = (1 - level) / 2
    return {"mean": observed, "ci": [float(np.quantile(diffs, a)), float(np.quantile(diffs, 1 - a))],
            "resamples": resamples}


# ------------------------------------------------------------------------------------ confirmatory analysis


def paired_t_pvalue(d: Sequence[float]) -> float | None:
    """Two-sided p-value of the one-sample t-test of mean(d) = 0 (d: per-seed paired differences); None for
    fewer than 2 values, 1.0 when every difference is 0, 0.0 when they are all equal and non-zero."""
    d = [float(v) for v in d]
    n = len(d)
    if n < 2:
        return None
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    from scipy.stats import t
    return float(2.0 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input's order.

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)) with m the number of p-values present
    (None stays None and does not count towards m: an endpoint that was not run).
    """
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def minimum_detectable_effect(sd: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true mean paired difference a two-sided paired t-test at ``alpha`` detects with ``power``,
    given the seed SD of the differences ``sd`` and ``n`` seeds: (t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)
    (the usual t approximation of the noncentral-t power equation). None for n < 2 or no sd."""
    if sd is None or n < 2:
        return None
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * float(sd) / math.sqrt(n)
