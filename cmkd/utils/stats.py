"""Small-sample statistics for the tables and the claims: t intervals, one-sided t tests
(one-sample, paired, Welch) and the slope of per-seed values, all from scipy's t distribution.

Everything takes per-seed values (or a summary mean / standard error / n) and returns plain
floats, so the reports and the claims make their decisions with one set of formulas:

- `t_interval(values)`: mean and the two-sided 95% interval mean +- t_{0.975, n-1} s / sqrt(n).
- `paired(a, b)`: per-seed differences a - b (same seed = same initialisation and batch order)
  and their interval; `verdict` turns an interval into better / worse / indistinguishable.
- `one_sided(diff, se, df)`: p-values of "diff > 0" and "diff < 0" from the t distribution.
- `welch(a, b)`: difference of two independent means, its standard error and Welch's df.
- `seed_slopes(y, x)`: per seed, the least-squares slope of y on x across sweep points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
VERDICTS = ("better", "worse", "indistinguishable")


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """{mean, ci95: [lo, hi], sem, n} of the mean of `values` (t distribution, n - 1 df).

    One value has no spread: its interval is None.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("no values")
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "sem": None, "n": n}
    sem = float(v.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    return {"mean": mean, "ci95": [mean - half, mean + half], "sem": sem, "n": n}


def verdict(ci: Sequence[float] | None) -> str:
    """`better` / `worse` when the interval of a difference excludes 0, else `indistinguishable`."""
    if ci is None:
        return "indistinguishable"
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "indistinguishable"


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Per-seed differences a - b: {mean, ci95, sem, n, verdict, values}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must have the same length, got {a.shape} and {b.shape}")
    d = a - b
    out = t_interval(d)
    out["verdict"] = verdict(out["ci95"])
    out["values"] = [float(x) for x in d]
    return out


def one_sided(diff: float, se: float, df: float) -> tuple[float, float]:
    """(p of "true difference > 0", p of "< 0") for an estimate `diff` with standard error `se`.

    A zero standard error (identical values) decides by the sign alone.
    """
    if se == 0 or not math.isfinite(se):
        if diff > 0:
            return 0.0, 1.0
        if diff < 0:
            return 1.0, 0.0
        return 1.0, 1.0
    t = diff / se
    return float(stats.t.sf(t, df)), float(stats.t.cdf(t, df))


def welch(a_mean: float, a_sem: float, a_n: int, b_mean: float, b_sem: float, b_n: int) -> tuple[float, float, float]:
    """(a - b, its standard error, Welch-Satterthwaite degrees of freedom) of independent means."""
    va, vb = a_sem ** 2, b_sem ** 2
    se = math.sqrt(va + vb)
    denom = (va ** 2 / (a_n - 1) if a_n > 1 else 0.0) + (vb ** 2 / (b_n - 1) if b_n > 1 else 0.0)
    df = (va + vb) ** 2 / denom if denom > 0 else float(max(a_n + b_n - 2, 1))
    return a_mean - b_mean, se, df


def seed_slopes(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on x for every seed: y, x [points, seeds] (x may be [points])."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = np.broadcast_to(x[:, None], y.shape)
    if y.shape != x.shape or y.ndim != 2 or y.shape[0] < 2:
        raise ValueError(f"a slope needs at least two points with values per seed, got y {y.shape}, x {x.shape}")
    xc = x - x.mean(axis=0)
    sxx = (xc ** 2).sum(axis=0)
    if np.any(sxx == 0):
        raise ValueError("x does not vary across the points for some seed: the slope is undefined")
    return (xc * (y - y.mean(axis=0))).sum(axis=0) / sxx
