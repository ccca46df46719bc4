"""The KD-gain predictor: ridge regression on standardised indicators (cmkd/diagnosis/indicators.py)
with a fixed penalty (params `diagnosis.predictor`), its 95% prediction interval from the t
distribution on the residuals; it is validated by leaving one whole sweep out at a time, with a
bootstrap over sweeps for the uncertainty of the held-out statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from cmkd.diagnosis.indicators import INDICATORS

#: The cluster bootstrap of the held-out statistics (`sweep_bootstrap`): whole sweeps are drawn
#: with replacement, because conditions of one sweep share a generator and are not independent.
#: Fixed here, declared before any interval was seen, so that validation.json is reproducible.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 26

# --------------------------------------------------------------------------- the predictor

def _design(rows: Sequence[Mapping[str, float]], features: Sequence[str]) -> np.ndarray:
    missing = [(i, f) for i, r in enumerate(rows) for f in features if r.get(f) is None or not np.isfinite(r[f])]
    if missing:
        raise ValueError(f"indicator {missing[0][1]!r} missing or not finite in row {missing[0][0]}")
    return np.array([[float(r[f]) for f in features] for r in rows], dtype=np.float64)


def fit_predictor(X: Sequence[Mapping[str, float]], y: Sequence[float], features: Sequence[str],
                  penalty: float = 1.0) -> dict[str, Any]:
    """Ridge regression of the KD gain `y` on the standardised indicators `features` of the rows
    `X` (the intercept not penalised). JSON-ready: the weights, the standardisation and what the
    prediction interval needs (residual variance, effective degrees of freedom, the inverse)."""
    a = _design(X, features)
    t = np.asarray(y, dtype=np.float64)
    n, p = a.shape
    if n < 3:
        raise ValueError(f"need at least 3 conditions to fit, got {n}")
    mean, std = a.mean(0), a.std(0, ddof=0)
    std = np.where(std > 1e-12, std, 1.0)
    z = np.hstack([np.ones((n, 1)), (a - mean) / std])
    pen = np.diag([0.0] + [float(penalty)] * p)
    inv = np.linalg.inv(z.T @ z + pen)
    w = inv @ z.T @ t
    hat = z @ inv @ z.T
    dof = max(1.0, n - float(np.trace(hat)))
    resid = t - z @ w
    return {"features": list(features), "penalty": float(penalty), "mean": mean.tolist(), "std": std.tolist(),
            "weights": w.tolist(), "sigma2": float(resid @ resid / dof), "dof": dof, "inv": inv.tolist(),
            "gram": (z.T @ z).tolist(), "n": int(n)}


def predict(model: Mapping[str, Any], X: Sequence[Mapping[str, float]] | Mapping[str, float],
            level: float = 0.95) -> list[dict[str, Any]] | dict[str, Any]:
    """Predicted KD gain with a `level` prediction interval for one indicator dict or a list."""
    single = isinstance(X, Mapping)
    rows = [X] if single else list(X)
    a = _design(rows, model["features"])
    z = np.hstack([np.ones((len(a), 1)), (a - np.asarray(model["mean"])) / np.asarray(model["std"])])
    inv, gram = np.asarray(model["inv"]), np.asarray(model["gram"])
    mean = z @ np.asarray(model["weights"])
    # Var(new y - prediction) = sigma^2 (1 + z' A^-1 Z'Z A^-1 z), A = Z'Z + penalty (ridge)
    var_fit = np.einsum("ij,jk,ki->i", z @ inv, gram, inv @ z.T)
    half = stats.t.ppf(0.5 + level / 2, model["dof"]) * np.sqrt(model["sigma2"] * (1.0 + var_fit))
    out = [{"mean": float(m), "ci95": [float(m - h), float(m + h)]} for m, h in zip(mean, half)]
    return out[0] if single else out


def leave_one_sweep_out(conditions: Sequence[Mapping[str, Any]], features: Sequence[str],
                        penalty: float = 1.0) -> list[dict[str, Any]]:
    """Every condition ({"sweep", "indicators", "gain", ...}) with `predicted` (mean, ci95) from
    a predictor fit on the other sweeps only (never on its own sweep's rows)."""
    out = []
    sweeps = sorted({c["sweep"] for c in conditions})
    for sweep in sweeps:
        train = [c for c in conditions if c["sweep"] != sweep]
        held = [c for c in conditions if c["sweep"] == sweep]
        model = fit_predictor([c["indicators"] for c in train], [c["gain"] for c in train], features, penalty)
        for c, p in zip(held, predict(model, [c["indicators"] for c in held])):
            out.append({**c, "predicted": p})
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def _midranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, n]: the mid-rank (ties averaged, as scipy's rankdata) of each row of `x` in the sample
    where row j appears `weights[b, j]` times."""
    below = weights @ (x[None, :] < x[:, None]).T.astype(np.float64)
    tied = weights @ (x[None, :] == x[:, None]).T.astype(np.float64)
    return below + (tied + 1.0) / 2.0


def weighted_spearman(a: Sequence[float], b: Sequence[float], weights: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of `a` and `b` in each of the B samples where row j appears
    `weights[b, j]` times (an integer count), for all B at once: the Pearson correlation of the
    samples' mid-ranks. NaN where a sample has fewer than 3 rows or a constant side."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    rx, ry = _midranks(x, w), _midranks(y, w)
    total = w.sum(1)
    mx, my = (w * rx).sum(1) / total, (w * ry).sum(1) / total
    dx, dy = rx - mx[:, None], ry - my[:, None]
    vx, vy = (w * dx * dx).sum(1), (w * dy * dy).sum(1)
    ok = (total >= 3) & (vx > 1e-9) & (vy > 1e-9)  # mid-ranks are halves: a real spread is >= 1/4
    r = np.full(len(w), np.nan)
    r[ok] = (w * dx * dy).sum(1)[ok] / np.sqrt(vx[ok] * vy[ok])
    return np.clip(r, -1.0, 1.0)


def _percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    return [float(v) for v in np.percentile(values, [50 * (1 - level), 50 * (1 + level)])]


def sweep_bootstrap(heldout: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """95% percentile intervals of the pooled held-out Spearman and sign accuracy of
    `leave_one_sweep_out`'s output, resampling whole sweeps with replacement (a sweep drawn twice
    contributes all its conditions twice). The held-out predictions are kept as they are (not
    refit per resample): the interval is over which sweeps the evaluation happened to have."""
    sweeps = sorted({c["sweep"] for c in heldout})
    if not sweeps:
        return {"spearman_heldout_ci95": None, "sign_accuracy_ci95": None}
    of_row = np.array([sweeps.index(c["sweep"]) for c in heldout])
    pred = np.array([c["predicted"]["mean"] for c in heldout], dtype=np.float64)
    gain = np.array([c["gain"] for c in heldout], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sweeps), size=(resamples, len(sweeps)))
    times_drawn = np.zeros((resamples, len(sweeps)))
    np.add.at(times_drawn, (np.arange(resamples)[:, None], draws), 1.0)
    weights = times_drawn[:, of_row]  # [B, conditions]: how often each condition is in resample b
    spearman = weighted_spearman(pred, gain, weights)
    sign = weights @ (np.sign(pred) == np.sign(gain)).astype(np.float64) / weights.sum(1)
    return {"spearman_heldout_ci95": _percentile_interval(spearman), "sign_accuracy_ci95": _percentile_interval(sign),
            "bootstrap": {"unit": "sweep", "resamples": int(resamples), "seed": int(seed),
                          "resamples_with_spearman": int(np.isfinite(spearman).sum())}}


def validation_summary(heldout: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """{"conditions", "sweeps", "spearman_heldout", "spearman_heldout_ci95", "sign_accuracy",
    "sign_accuracy_ci95", "bootstrap", "per_sweep": {sweep: {"spearman", "n"}}} of
    `leave_one_sweep_out`'s output (a sign is right when predicted and measured gain have the
    same sign, zero counting as its own sign; the intervals from `sweep_bootstrap`)."""
    pred = [c["predicted"]["mean"] for c in heldout]
    gain = [c["gain"] for c in heldout]
    per_sweep = {}
    for sweep in sorted({c["sweep"] for c in heldout}):
        rows = [c for c in heldout if c["sweep"] == sweep]
        per_sweep[sweep] = {"spearman": _spearman([c["predicted"]["mean"] for c in rows],
                                                  [c["gain"] for c in rows]), "n": len(rows)}
    boot = sweep_bootstrap(heldout, resamples, seed)
    return {"conditions": len(heldout), "sweeps": len(per_sweep), "spearman_heldout": _spearman(pred, gain),
            "spearman_heldout_ci95": boot["spearman_heldout_ci95"],
            "sign_accuracy": float(np.mean(np.sign(pred) == np.sign(gain))) if heldout else None,
            "sign_accuracy_ci95": boot["sign_accuracy_ci95"], "bootstrap": boot.get("bootstrap"),
            "per_sweep": per_sweep}


def standing(spearman_ci95: Sequence[float] | None) -> str:
    """"prediction" when the held-out Spearman's interval over sweeps lies above 0, else "prior":
    until then the predicted gain is exploratory (an interval below 0 means it ranks the wrong way)."""
    return "prediction" if spearman_ci95 is not None and spearman_ci95[0] > 0 else "prior"


def indicator_correlations(conditions: Sequence[Mapping[str, Any]],
                           names: Sequence[str] = INDICATORS) -> dict[str, dict[str, Any]]:
    """Per sweep (and `all`), the Spearman correlation of each indicator with the measured gain."""
    out = {}
    for sweep in ["all", *sorted({c["sweep"] for c in conditions})]:
        rows = [c for c in conditions if sweep == "all" or c["sweep"] == sweep]
        gain = [c["gain"] for c in rows]
        out[sweep] = {name: _spearman([c["indicators"].get(name, math.nan) for c in rows], gain)
                      if all(c["indicators"].get(name) is not None for c in rows) else None for name in names}
    return out
