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
    def mean(v):
        return (v * w).sum() / max(w.sum(), 1e-12)

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


# ---------------------------------------------------------------- NTDH's divergence form and PSSM


def np_ntdh_div(p, q):
    """NTDH's code: 0.5 [KL(m || p) + KL(m || q)], m the mean (the reverse of textbook JS)."""
    m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
    return 0.5 * np_kl(m, p) + 0.5 * np_kl(m, q)


def np_divergences_ntdh(zs, zt, y, temperature=1.0):
    rows = list(zip(np_rows(zs), np_rows(zt), np.ravel(y)))
    target = [np_ntdh_div(np_binary(s, c, temperature),
                          np_binary(t, c, temperature)) if c >= 0 else 0.0 for s, t, c in rows]
    non_target = [np_ntdh_div(np_non_target(s, c, temperature),
                              np_non_target(t, c, temperature)) if c >= 0 else 0.0 for s, t, c in rows]
    return np.array(target), np.array(non_target)


def test_ntdh_form_matches_numpy_and_differs_from_js(rng):
    for c, temperature in [(4, 1.0), (10, 1.0), (6, 3.0)]:
        zs, zt = rng.normal(size=(9, c)) * 3, rng.normal(size=(9, c)) * 3
        y = rng.integers(0, c, 9)
        td, ntd = np_divergences_ntdh(zs, zt, y, temperature)
        close(L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), temperature, form="ntdh"), ntd)
        close(L.target_divergence(t64(zs), t64(zt), torch.tensor(y), temperature, form="ntdh"), td)
        # the default stays textbook JS, and the two forms really differ on these rows
        js = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), temperature)
        close(js, np_non_target_divergence(zs, zt, y, temperature))
        assert not np.allclose(js.numpy(), ntd, rtol=1e-3)


def test_ntdh_form_matches_ntdh_reference_formula_on_probabilities(rng):
    """NTDH's code path: softmax of the logits with the target pushed to -1000, then
    F.kl_div(log p, m, 'sum') / N per side; per-sample mean = the batch value NTDH logs."""
    zs, zt = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    y = rng.integers(0, 5, 7)
    gt = np.eye(5)[y]
    ps, pt = np_softmax(zs - 1000.0 * gt), np_softmax(zt - 1000.0 * gt)
    m = 0.5 * (ps + pt)
    with np.errstate(divide="ignore", invalid="ignore"):
        def kl(p):
            return np.where(m > 0, m * (np.log(np.where(m > 0, m, 1)) - np.log(np.where(p > 0, p, 1))),
                            0).sum() / len(y)

    batch_value = 0.5 * (kl(ps) + kl(pt))
    ntd = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), form="ntdh")
    assert math.isclose(float(ntd.mean()), batch_value, rel_tol=1e-9)


def test_ntdh_form_segmentation_ignore_and_edge_cases(rng):
    zs, zt = rng.normal(size=(2, 4, 2, 3)), rng.normal(size=(2, 4, 2, 3))
    y = rng.integers(0, 4, (2, 2, 3))
    y[0, 1, 2] = -1
    ntd = L.non_target_divergence(t64(zs), t64(zt), torch.tensor(y), form="ntdh")
    assert ntd.shape == (2, 2, 3) and ntd[0, 1, 2] == 0
    close(ntd.reshape(-1), np_divergences_ntdh(zs, zt, y)[1])
    # equal rows: 0; two classes: no non-target distribution, 0; dominant logits stay finite
    z = rng.normal(size=(3, 4))
    assert torch.allclose(L.non_target_divergence(t64(z), t64(z), torch.tensor([0, 1, 2]), form="ntdh"),
                          torch.zeros(3, dtype=torch.float64))
    assert torch.equal(L.non_target_divergence(t64(z[:, :2]), t64(-z[:, :2]), torch.tensor([0, 1, 0]), form="ntdh"),
                       torch.zeros(3, dtype=torch.float64))
    big = torch.tensor([[80.0, -80.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = L.non_target_divergence(big, torch.tensor([[0.0, 90.0, -90.0, 0.0]], dtype=torch.float64),
                                  torch.tensor([0]), form="ntdh")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all() and out.item() > 10


def test_unknown_divergence_form_is_rejected():
    z = torch.zeros(2, 3)
    for fn in (L.non_target_divergence, L.target_divergence):
        with pytest.raises(ValueError, match="unknown divergence form 'kl'"):
            fn(z, z, torch.tensor([0, 1]), form="kl")


def np_pssm(zs, zt, y, threshold=0.996):
    """Independent reference: NTDH's `pd_diff` rule, per row, plain Python/NumPy."""
    out = []
    for s, t, c in zip(np_rows(zs), np_rows(zt), np.ravel(y)):
        s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
        if c < 0:
            out.append(0.0)
            continue
        n = np.linalg.norm(s) * np.linalg.norm(t)
        cos = float(s @ t / n) if n > 0 else 0.0
        if int(np.argmax(t)) == c:
            out.append(1.0)
        elif cos >= threshold:
            out.append((1.0 + cos) / 2.0)
        else:
            out.append(0.0)
    return np.array(out)


def test_pssm_weights_match_numpy(rng):
    zt = rng.normal(size=(200, 5))
    # a third of the students near the teacher (cosine above 0.996), the rest random
    zs = np.where(np.arange(200)[:, None] % 3 == 0, zt + 0.01 * rng.normal(size=(200, 5)), rng.normal(size=(200, 5)))
    y = rng.integers(0, 5, 200)
    w = L.pssm_weights(t64(zs), t64(zt), torch.tensor(y))
    ref = np_pssm(zs, zt, y)
    close(w, ref)
    wrong = np.argmax(zt, 1) != y
    # every kind of row occurs: right (1), wrong but aligned (in (0.998, 1)), wrong and not (0)
    assert (ref[~wrong] == 1).all() and ((ref[wrong] > 0.998) & (ref[wrong] < 1)).any() and (ref[wrong] == 0).any()
    close(L.pssm_weights(t64(zs), t64(zt), torch.tensor(y), cos_threshold=0.5), np_pssm(zs, zt, y, 0.5))


def test_pssm_weights_edge_cases():
    y = torch.tensor([1, 1, 1, 0])
    zt = t64([[1.0, 0.0], [1.0, 0.0],
              [1.0, 0.0], [0.0, 0.0]])   # teacher wrong on rows 0-2; row 3: zero row, argmax 0 = right
    cos_at = 0.996
    angle = math.acos(cos_at)
    zs = t64([[math.cos(angle), math.sin(angle)],        # cosine exactly at the threshold (within rounding)
              [0.0, 0.0],                                # zero student row: cosine 0 -> weight 0
              [-1.0, 0.0],                               # opposite: weight 0
              [3.0, 1.0]])
    w = L.pssm_weights(zs, zt, y, cos_threshold=cos_at - 1e-12)
    close(w, [(1 + cos_at) / 2, 0.0, 0.0, 1.0], 1e-9)
    assert L.pssm_weights(zs, zt, y, cos_threshold=cos_at + 1e-9)[0] == 0  # just above: dropped
    # all wrong and unaligned: every weight 0
    assert torch.equal(L.pssm_weights(-zt[:3], zt[:3], y[:3]), torch.zeros(3, dtype=torch.float64))


def test_pssm_weights_segmentation_with_ignore(rng):
    zs, zt = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    zs[1] = zt[1] * 2.0 + 1e-3  # cosine ~1: the teacher-wrong pixels of image 1 keep ~(1 + 1) / 2
    y = rng.integers(0, 3, (2, 4, 5))
    y[0, 0, :3] = -1
    w = L.pssm_weights(t64(zs), t64(zt), torch.tensor(y))
    assert w.shape == (2, 4, 5)
    assert torch.equal(w[0, 0, :3], torch.zeros(3, dtype=torch.float64))
    close(w.reshape(-1), np_pssm(zs, zt, y))
    assert L.pssm_weights(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32),
                          torch.tensor(y)).dtype == torch.float32
