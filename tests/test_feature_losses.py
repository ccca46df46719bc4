"""rkd_loss and at_loss against independent NumPy references (loops over pairs / triples)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cmkd.losses import at_loss, rkd_loss


def np_smooth_l1(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return np.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()


def np_rkd(s, t, wd=25.0, wa=50.0):
    def distances(x):
        n = len(x)
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        pos = d[d > 0]
        return d / pos.mean() if len(pos) else d

    def angles(x):
        n = len(x)
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = x[j] - x[i], x[k] - x[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            if nu > 0 and nv > 0:
                out[i, j, k] = u @ v / (nu * nv)
        return out

    s = np.asarray(s, np.float64).reshape(len(s), -1)
    t = np.asarray(t, np.float64).reshape(len(t), -1)
    return wd * np_smooth_l1(distances(s), distances(t)) + wa * np_smooth_l1(angles(s), angles(t))


def np_at(s, t, p=2):
    def amap(x):
        a = (np.abs(np.asarray(x, np.float64)) ** p).mean(axis=1).reshape(len(x), -1)
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)

    return ((amap(s) - amap(t)) ** 2).mean()


@pytest.mark.parametrize("n,ds,dt", [(6, 5, 5), (7, 4, 9), (2, 3, 3), (3, 1, 6)])
def test_rkd_matches_numpy(n, ds, dt):
    rng = np.random.default_rng(n * 100 + ds)
    s, t = rng.normal(size=(n, ds)), rng.normal(size=(n, dt)) * 3.0
    got = rkd_loss(torch.tensor(s), torch.tensor(t)).item()
    assert got == pytest.approx(np_rkd(s, t), rel=1e-9, abs=1e-12)
    got_w = rkd_loss(torch.tensor(s), torch.tensor(t), distance_weight=1.0, angle_weight=0.0).item()
    assert got_w == pytest.approx(np_rkd(s, t, 1.0, 0.0), rel=1e-9, abs=1e-12)
    assert got > 0 or n == 2  # two points: both relations are scale-free and always agree


def test_rkd_edge_cases():
    x = torch.randn(5, 8, dtype=torch.float64)
    assert rkd_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    # relations are invariant to scale and translation of one side
    assert rkd_loss(x, 4.0 * x + 1.5).item() == pytest.approx(0.0, abs=1e-10)
    one = torch.randn(1, 4, dtype=torch.float64)
    assert rkd_loss(one, torch.randn(1, 7, dtype=torch.float64)).item() == 0.0
    # N = 2: distances normalise to 1 and the angles agree whatever the points
    two_s, two_t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    assert rkd_loss(two_s, two_t).item() == pytest.approx(np_rkd(two_s.numpy(), two_t.numpy()), abs=1e-12)
    # every student row equal: defined (no NaN), gradient finite
    same = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    loss = rkd_loss(same, t)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(np_rkd(np.zeros((4, 3)), t.numpy()))
    assert torch.isfinite(same.grad).all()
    # spatial inputs are flattened per sample
    s4, t4 = np.random.default_rng(1).normal(size=(2, 4, 5, 2, 2))
    assert rkd_loss(torch.tensor(s4), torch.tensor(t4)).item() == pytest.approx(np_rkd(s4, t4), rel=1e-9)


def test_rkd_coinciding_rows_and_blocks():
    """Two equal rows (cosine 0 for their zero difference, as the reference) and a batch large
    enough that the angle term is built in several blocks of rows."""
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(9, 4)), rng.normal(size=(9, 6))
    s[5] = s[2]
    got = rkd_loss(torch.tensor(s), torch.tensor(t)).item()
    assert got == pytest.approx(np_rkd(s, t), rel=1e-9, abs=1e-12)
    from cmkd import losses

    n = 70  # 70 x 70 x 70 entries: 2 blocks of rows at the module's block size (1 row: 4,900)
    assert losses._ANGLE_BLOCK_ENTRIES // (n * n) < n
    s, t = rng.normal(size=(n, 3)), rng.normal(size=(n, 5))
    got = rkd_loss(torch.tensor(s), torch.tensor(t), distance_weight=0.0, angle_weight=1.0).item()
    assert got == pytest.approx(np_rkd(s, t, 0.0, 1.0), rel=1e-9)


def test_rkd_float32_far_from_the_origin():
    """Embeddings with a large common offset (ReLU features often are): float32 angles computed
    from the centred Gram matrix stay at float32 precision of the float64 reference."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=(40, 16)) + 1000.0
    t = rng.normal(size=(40, 24)) * 2.0 - 300.0
    want = np_rkd(s, t, 0.0, 1.0)
    got = rkd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                   distance_weight=0.0, angle_weight=1.0).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_rkd_gradient_reaches_student_only():
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 6, requires_grad=True)
    rkd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("cs,ct,hw,p",
    [(4, 4, (5, 5), 2), (3, 8, (4, 6), 2), (2, 5, (3, 3), 1), (6, 2, (1, 1), 2), (3, 3, (4, 4), 3)])
def test_at_matches_numpy(cs, ct, hw, p):
    rng = np.random.default_rng(cs * 10 + ct)
    s, t = rng.normal(size=(3, cs, *hw)), rng.normal(size=(3, ct, *hw))
    got = at_loss(torch.tensor(s), torch.tensor(t), p=p).item()
    assert got == pytest.approx(np_at(s, t, p), rel=1e-9, abs=1e-15)


def test_at_edge_cases():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert at_loss(x, x).item() == 0.0
    # scale of either side does not matter (maps are normalised), nor the channel count
    assert at_loss(x, 7.0 * x.repeat(1, 3, 1, 1)).item() == pytest.approx(0.0, abs=1e-15)
    zero = torch.zeros(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    loss = at_loss(zero, x)
    assert loss.item() == pytest.approx(np_at(np.zeros((2, 3, 5, 5)), x.numpy()))
    assert loss.item() == pytest.approx(1.0 / 25)  # a unit map against zeros: 1 / (H W) per sample
    loss.backward()
    assert torch.isfinite(zero.grad).all()
    assert at_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 5, 3, 3)).item() == 0.0
    with pytest.raises(ValueError, match="spatial"):
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        at_loss(torch.randn(2, 3), torch.randn(2, 3))
