"""Losses against independent plain-NumPy computations (hand-written softmax / KL / JS)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmkd import losses as L

# ---------------------------------------------------------------- NumPy references


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(p > 0, q, 1.0))), 0.0)
    return terms.sum(axis=-1)


def np_js(p, q):
    m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def np_binary(z, y, temperature):
    """[p_gt, sum of the others] (the rest summed, not 1 - p_gt, to stay exact near p_gt = 1)."""
    p = np_softmax(np.asarray(z, np.float64) / temperature)
    return np.array([p[y], np.delete(p, y).sum()])


def np_non_target(z, y, temperature):
    return np_softmax(np.delete(np.asarray(z, np.float64), y) / temperature)


def np_rows(x):
    """[N, C] or [N, C, H, W] -> [R, C] like cmkd.losses.to_rows."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def np_target_divergence(zs, zt, y, temperature=1.0):
    return np.array([np_js(np_binary(t, c, temperature), np_binary(s, c, temperature)) if c >= 0 else 0.0
                     for s, t, c in zip(np_rows(zs), np_rows(zt), np.ravel(y))])


def np_non_target_divergence(zs, zt, y, temperature=1.0):
    return np.array([np_js(np_non_target(t, c, temperature), np_non_target(s, c, temperature)) if c >= 0 else 0.0
                     for s, t, c in zip(np_rows(zs), np_rows(zt), np.ravel(y))])


def np_dkd(zs, zt, y, alpha, beta, temperature, weights=None):
    rows_s, rows_t, y = np_rows(zs), np_rows(zt), np.ravel(y)
    w = np.ones(len(y)) if weights is None else np.ravel(weights).astype(np.float64)
    w = w * (y >= 0)
    tckd = np.zeros(len(y))
    nckd = np.zeros(len(y))
    for i, (s, t, c) in enumerate(zip(rows_s, rows_t, y)):
        if c < 0:
            continue
        tckd[i] = np_kl(np_binary(t, c, temperature), np_binary(s, c, temperature))
        nckd[i] = np_kl(np_non_target(t, c, temperature), np_non_target(s, c, temperature))
    mean = lambda v: (v * w).sum() / max(w.sum(), 1e-12)
    return temperature**2 * (alpha * mean(tckd) + beta * mean(nckd))


def t64(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def close(actual, expected, tol=1e-9):
    np.testing.assert_allclose(np.asarray(actual.detach() if torch.is_tensor(actual) else actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- JS helper


def test_js_divergence_matches_numpy_with_zeros(rng):
    p = np_softmax(rng.normal(size=(5, 6)) * 3)
    q = np_softmax(rng.normal(size=(5, 6)) * 3)
    p[0] = [1, 0, 0, 0, 0, 0]
    q[0] = [0, 1, 0, 0, 0, 0]          # disjoint supports: JS = ln 2
    q[1] = p[1]                         # identical: JS = 0
    got = L.js_divergence(t64(p), t64(q))
    close(got, np_js(p, q))
    assert abs(float(got[0]) - math.log(2)) < 1e-12
    assert float(got[1]) == 0.0


def test_js_divergence_gradient_finite_on_zeros():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], requires_grad=True)
    L.js_divergence(p, q).sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- target / non-target divergence


def test_divergences_classification_match_numpy(rng):
    zs, zt = rng.normal(size=(7, 5)) * 2, rng.normal(size=(7, 5)) * 2
    y = rng.integers(0, 5, size=7)
    for temperature in (1.0, 3.0):
        td = L.target_divergence(t64(zs), t64(zt), torch.tensor(y), temperature)
        ntd = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), temperature)
        assert td.shape == (7,) and ntd.shape == (7,)
        close(td, np_target_divergence(zs, zt, y, temperature))
        close(ntd, np_non_target_divergence(zs, zt, y, temperature))


def test_divergences_segmentation_with_ignore_match_numpy(rng):
    zs, zt = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 4, 3, 5))
    y = rng.integers(0, 4, size=(2, 3, 5))
    y[0, 1, 2] = y[1, 0, 0] = -1
    ntd = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), 2.0)
    td = L.target_divergence(t64(zs), t64(zt), torch.tensor(y), 2.0)
    assert ntd.shape == (2, 3, 5) and td.shape == (2, 3, 5)
    close(ntd.reshape(-1), np_non_target_divergence(zs, zt, y, 2.0))
    close(td.reshape(-1), np_target_divergence(zs, zt, y, 2.0))
    assert float(ntd[0, 1, 2]) == 0.0 and float(td[1, 0, 0]) == 0.0


def test_non_target_divergence_ignores_the_target_logit(rng):
    """Removed, not damped: changing only the target logits leaves the divergence unchanged."""
    zs, zt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    y = np.array([0, 3, 5, 2])
    zt2, zs2 = zt.copy(), zs.copy()
    zt2[np.arange(4), y] += 50.0
    zs2[np.arange(4), y] -= 7.0
    a = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y))
    b = L.non_target_divergence(t64(zs2), t64(zt2), torch.tensor(y))
    close(a, b, 1e-12)


def test_two_classes_non_target_divergence_is_zero(rng):
    zs, zt = rng.normal(size=(5, 2)) * 4, rng.normal(size=(5, 2)) * 4
    y = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(L.non_target_divergence(t64(zs), t64(zt), y), torch.zeros(5, dtype=torch.float64))
    close(L.target_divergence(t64(zs), t64(zt), y), np_target_divergence(zs, zt, y.numpy()))


def test_dominant_class_is_finite_and_correct():
    # float32, probabilities ~1 / ~0 (exp(-120) underflows in float32).
    zs = torch.tensor([[120.0, 0.0, -5.0], [0.0, 200.0, 1.0], [3.0, 2.0, 1.0]], requires_grad=True)
    zt = torch.tensor([[0.0, 130.0, 1.0], [0.0, 190.0, 5.0], [90.0, -90.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    td = L.target_divergence(zs, zt, y)
    ntd = L.non_target_divergence(zs, zt, y)
    close(td, np_target_divergence(zs.detach().numpy(), zt.numpy(), y.numpy()), 1e-5)
    close(ntd, np_non_target_divergence(zs.detach().numpy(), zt.numpy(), y.numpy()), 1e-5)
    loss = td.sum() + ntd.sum() + L.dkd_loss(zs, zt, y, 1.0, 8.0, 1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(zs.grad).all()


def test_batch_of_one(rng):
    zs, zt = rng.normal(size=(1, 4)), rng.normal(size=(1, 4))
    y = np.array([2])
    close(L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y)), np_non_target_divergence(zs, zt, y))
    close(L.dkd_loss(t64(zs), t64(zt), torch.tensor(y), 1.0, 8.0, 4.0), np_dkd(zs, zt, y, 1.0, 8.0, 4.0))


# ---------------------------------------------------------------- DKD


def test_dkd_matches_numpy_with_target_removed(rng):
    zs, zt = rng.normal(size=(9, 7)) * 3, rng.normal(size=(9, 7)) * 3
    y = rng.integers(0, 7, size=9)
    for alpha, beta, temperature in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        got = L.dkd_loss(t64(zs), t64(zt), torch.tensor(y), alpha, beta, temperature)
        close(got, np_dkd(zs, zt, y, alpha, beta, temperature))
    tckd, nckd = L.dkd_terms(t64(zs), t64(zt), torch.tensor(y), 4.0)
    close(tckd, np_dkd(zs, zt, y, 1.0, 0.0, 4.0))
    close(nckd, np_dkd(zs, zt, y, 0.0, 1.0, 4.0))


def test_dkd_equals_the_reference_formulation_for_moderate_logits(rng):
    """mdistiller subtracts 1000 * gt_mask before the NCKD softmax; for moderate logits that is
    (numerically) removal, and must agree with ours."""
    zs, zt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    y = rng.integers(0, 5, size=6)
    temperature = 4.0
    s, t = t64(zs), t64(zt)
    gt = torch.nn.functional.one_hot(torch.tensor(y), 5).double()
    ps, pt = torch.softmax(s / temperature, 1), torch.softmax(t / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() / 6 * temperature**2
    pt2 = torch.softmax(t / temperature - 1000 * gt, 1)
    log_ps2 = torch.log_softmax(s / temperature - 1000 * gt, 1)
    nckd = torch.nn.functional.kl_div(log_ps2, pt2, reduction="sum") / 6 * temperature**2
    close(L.dkd_loss(s, t, torch.tensor(y), 1.0, 8.0, temperature), tckd + 8.0 * nckd, 1e-10)


def test_dkd_segmentation_with_mask_and_ignore(rng):
    zs, zt = rng.normal(size=(2, 5, 4, 3)), rng.normal(size=(2, 5, 4, 3))
    y = rng.integers(0, 5, size=(2, 4, 3))
    y[0, 0, 0] = y[1, 3, 2] = -1
    mask = rng.random(size=(2, 4, 3)) > 0.3
    weights = rng.random(size=(2, 4, 3))
    close(L.dkd_loss(t64(zs), t64(zt), torch.tensor(y), 1.0, 8.0, 2.0, mask=torch.tensor(mask)),
          np_dkd(zs, zt, y, 1.0, 8.0, 2.0, mask))
    close(L.dkd_loss(t64(zs), t64(zt), torch.tensor(y), 2.0, 3.0, 2.0, mask=t64(weights)),
          np_dkd(zs, zt, y, 2.0, 3.0, 2.0, weights))


def test_dkd_two_classes_has_no_nckd(rng):
    zs, zt = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    y = np.array([0, 1, 0, 1])
    tckd, nckd = L.dkd_terms(t64(zs), t64(zt), torch.tensor(y), 3.0)
    assert float(nckd) == 0.0
    close(tckd, np_dkd(zs, zt, y, 1.0, 0.0, 3.0))


def test_dkd_all_ignored_is_zero_with_gradient():
    zs = torch.randn(3, 4, requires_grad=True)
    loss = L.dkd_loss(zs, torch.randn(3, 4), torch.tensor([-1, -1, -1]), 1.0, 8.0, 4.0)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------- MLKD pieces


def test_kd_rows_matches_numpy(rng):
    zs, zt = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    got = L.kd_rows(t64(zs), t64(zt), 3.0)
    assert got.shape == (2, 2, 2)
    want = [9.0 * np_kl(np_softmax(t / 3.0), np_softmax(s / 3.0)) for s, t in zip(np_rows(zs), np_rows(zt))]
    close(got.reshape(-1), want)


def np_batch_corr(ps, pt, w, r=1):
    diff = ps @ ps.T - pt @ pt.T
    return (np.outer(w, w) * diff**2).sum() / (w.sum() * r)


def np_class_corr(ps, pt, w, r=1):
    diff = (ps.T * w) @ ps / r - (pt.T * w) @ pt / r
    return (diff**2).sum() / ps.shape[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correlation_losses_match_numpy(rng, dtype):
    ps, pt = np_softmax(rng.normal(size=(11, 6))), np_softmax(rng.normal(size=(11, 6)))
    ones = np.ones(11)
    sel = (rng.random(11) > 0.4).astype(float)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for w, r in ((ones, 1), (sel, 1), (sel, 4)):
        args = (torch.tensor(ps, dtype=dtype), torch.tensor(pt, dtype=dtype), torch.tensor(w, dtype=dtype), r)
        close(L.batch_correlation_loss(*args), np_batch_corr(ps, pt, w, r), tol)
        close(L.class_correlation_loss(*args), np_class_corr(ps, pt, w, r), tol)
    # a 0/1 weight is the same as dropping the rows
    keep = sel.astype(bool)
    close(L.batch_correlation_loss(t64(ps), t64(pt), t64(sel)), np_batch_corr(ps[keep], pt[keep], ones[keep]))
    close(L.class_correlation_loss(t64(ps), t64(pt), t64(sel)), np_class_corr(ps[keep], pt[keep], ones[keep]))


def test_correlation_losses_batched_over_temperatures(rng):
    # [K, R, C] (one slice per temperature) gives the K losses of the slices.
    ps = np.stack([np_softmax(rng.normal(size=(9, 5))) for _ in range(3)])
    pt = np.stack([np_softmax(rng.normal(size=(9, 5))) for _ in range(3)])
    w = (rng.random(9) > 0.3).astype(float)
    got_b = L.batch_correlation_loss(t64(ps), t64(pt), t64(w), 2)
    got_c = L.class_correlation_loss(t64(ps), t64(pt), t64(w), 2)
    assert got_b.shape == got_c.shape == (3,)
    close(got_b, [np_batch_corr(ps[k], pt[k], w, 2) for k in range(3)])
    close(got_c, [np_class_corr(ps[k], pt[k], w, 2) for k in range(3)])


def test_correlation_losses_gradients_and_zero_weights():
    ps = torch.softmax(torch.randn(5, 3), 1).requires_grad_(True)
    pt = torch.softmax(torch.randn(5, 3), 1)
    (L.batch_correlation_loss(ps, pt, torch.ones(5)) + L.class_correlation_loss(ps, pt, torch.ones(5))).backward()
    assert torch.isfinite(ps.grad).all() and ps.grad.abs().sum() > 0
    assert float(L.batch_correlation_loss(ps, pt, torch.zeros(5)).detach()) == 0.0
    assert float(L.batch_correlation_loss(pt, pt, torch.ones(5))) == pytest.approx(0.0, abs=1e-6)
