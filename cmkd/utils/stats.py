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
- `two_sided_p(mean, sem, df, margin)`: two-sided p of "the difference lies beyond +-margin"
  (margin 0: the usual t test against 0); `holm(ps)`: Holm's step-down adjusted p-values;
  `table_verdict(...)`: better / worse / equivalent / indistinguishable from them (the tables).
- `min_detectable_effect(sd, n)`: the smallest true difference a paired t test of n seeds finds
  with the given power (noncentral t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
VERDICTS = ("better", "worse", "indistinguishable")
#: the tables' verdicts (table_verdict): `equivalent` is a difference shown to be inside the margin
TABLE_VERDICTS = ("better", "worse", "equivalent", "indistinguishable")
POWER = 0.8


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


def two_sided_p(mean: float, sem: float | None, df: float, margin: float = 0.0) -> float | None:
    """Two-sided p-value of H0 "|true difference| <= margin" for an estimate `mean` with standard
    error `sem`: 2 x the smaller of P(T >= (mean - margin) / sem) and P(T <= (mean + margin) / sem),
    capped at 1. With margin 0 it is the usual two-sided t test against 0; rejecting at alpha puts
    the 1 - alpha interval wholly beyond +margin or below -margin. None without a standard error
    (one seed); a zero standard error (identical differences) decides by |mean| against the margin."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if sem is None or df < 1:
        return None
    if sem == 0:
        return 0.0 if abs(mean) > margin else 1.0
    up = float(stats.t.sf((mean - margin) / sem, df))
    down = float(stats.t.cdf((mean + margin) / sem, df))
    return min(1.0, 2.0 * min(up, down))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha when rejecting those
    below alpha): the i-th smallest of k p-values times (k - i + 1), made non-decreasing, capped
    at 1. None (no test) stays None and does not count in k."""
    index = [i for i, p in enumerate(pvalues) if p is not None]
    for i in index:
        if not 0.0 <= pvalues[i] <= 1.0:  # type: ignore[operator]
            raise ValueError(f"p-values must lie in [0, 1], got {pvalues[i]}")
    order = sorted(index, key=lambda i: pvalues[i])  # type: ignore[arg-type, return-value]
    k = len(order)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


def table_verdict(mean: float | None, ci95: Sequence[float] | None, p_holm: float | None, margin: float,
                  alpha: float = ALPHA) -> str:
    """A table row against STUDENT: `better` / `worse` when the Holm-adjusted p of "beyond
    +-margin" (two_sided_p, holm) is below alpha, on the side of the mean; `equivalent` when the
    95% interval of the difference lies inside (-margin, +margin) (two one-sided tests at 2.5%);
    else `indistinguishable`. The two cannot both hold: a significant difference beyond the
    margin has its 95% interval outside it."""
    if mean is None:
        return "indistinguishable"
    if p_holm is not None and p_holm < alpha and abs(mean) > margin:
        return "better" if mean > 0 else "worse"
    if margin > 0 and ci95 is not None and -margin < ci95[0] and ci95[1] < margin:
        return "equivalent"
    return "indistinguishable"


def power_paired(effect: float, sd: float, n: int, alpha: float = ALPHA, margin: float = 0.0) -> float:
    """Power of the two-sided test of "beyond +-margin" (two_sided_p) at `alpha` over n paired
    differences with standard deviation `sd`, when the true difference is `effect` (noncentral t)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"power needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    scale = math.sqrt(n) / sd
    # P(T'(d) < -c) = P(T'(-d) > c): scipy's nct.cdf turns NaN deep in the left tail, its sf does not
    up = float(stats.nct.sf(crit, df, (effect - margin) * scale))
    down = float(stats.nct.sf(crit, df, -(effect + margin) * scale))
    return up + down


def min_detectable_effect(sd: float, n: int, power: float = POWER, alpha: float = ALPHA, margin: float = 0.0) -> float:
    """The smallest true difference (in the unit of `sd`) that the two-sided paired t test at `alpha`
    over n seeds detects with probability `power` (power_paired solved for the effect). With a
    margin: the effect at which a verdict beyond +-margin has that power."""
    from scipy.optimize import brentq

    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"power and alpha must lie in (0, 1), got {power}, {alpha}")
    hi = margin + sd
    while power_paired(hi, sd, n, alpha, margin) < power:  # power rises with the effect: bracket it
        hi = margin + 2 * (hi - margin)
    return float(brentq(lambda e: power_paired(e, sd, n, alpha, margin) - power, margin, hi, xtol=1e-12 * sd))
