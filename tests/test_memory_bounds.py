"""Memory bounds: Algorithm 1's saliency passes are sized by elements, not rows, and give the
same saliency whatever the pass size; seed workers are limited by memory as well as cores."""

import torch
from torch import nn

import cmkd.methods.mfh as mfh


def test_rows_per_pass_bounds_elements_and_keeps_small_rows_unchanged():
    assert mfh._rows_per_pass(torch.zeros(100, 32), 8192) == 8192  # vector rows: as before
    big = torch.zeros(2, 64, 32, 128)  # a segmentation feature map per row
    rows = mfh._rows_per_pass(big, 8192)
    assert rows * 64 * 32 * 128 <= mfh.MAX_PASS_ELEMENTS and rows >= 1


def test_saliency_does_not_depend_on_the_pass_size(monkeypatch):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(6, 3, 1), nn.Upsample(scale_factor=2))
    x = torch.randn(10, 6, 4, 5)
    ref = torch.randn(10, 3, 8, 10)
    full = mfh.permutation_saliency(head, x, ref, 3, torch.Generator().manual_seed(1), loss="mse")
    monkeypatch.setattr(mfh, "MAX_PASS_ELEMENTS", 6 * 4 * 5 * 3)  # three rows per pass
    small = mfh.permutation_saliency(head, x, ref, 3, torch.Generator().manual_seed(1), loss="mse")
    torch.testing.assert_close(full, small)


def test_seed_workers_follow_available_memory(monkeypatch):
    import stages._common as common

    monkeypatch.delenv("CMKD_SEED_WORKERS", raising=False)
    monkeypatch.setattr(common, "available_cores", lambda: 8)
    monkeypatch.setattr(common, "available_memory_gb", lambda: 7.0)
    monkeypatch.setenv("CMKD_SEED_WORKER_GB", "3")
    assert common.seed_workers() == 2
    monkeypatch.setattr(common, "available_memory_gb", lambda: 1.0)
    assert common.seed_workers() == 1
    monkeypatch.setattr(common, "available_memory_gb", lambda: None)
    assert common.seed_workers() == 8
    monkeypatch.setenv("CMKD_SEED_WORKERS", "5")
    assert common.seed_workers() == 5
