"""Memory bounds: Algorithm 1's saliency passes are sized by elements, not rows, and give the
same saliency whatever the pass size; seed workers are limited by memory as well as cores;
a process that keeps freed memory reuses large blocks instead of faulting fresh pages."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cmkd.methods.mfh as mfh

REPO = Path(__file__).resolve().parents[1]


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


def test_dvclive_seed_workers_follow_available_memory(monkeypatch):
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


_FAULTS_CHILD = """
import resource, sys
from cmkd.utils.parallel import keep_freed_memory
took = keep_freed_memory(1 << 30, 1 << 30) if sys.argv[1] == "kept" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = bytearray(64 << 20)  # zero-filled: every page written
    del block
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_fresh_pages():
    """glibc maps a 64 MB block afresh and unmaps it on free: 20 allocations fault ~20 x 16k
    pages. With the heap keeping freed memory, the first allocation faults and the rest reuse it."""
    pages = (64 << 20) // resource.getpagesize()

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
        return out[0], int(out[1])

    took, kept = faults("kept")
    _, default = faults("default")
    assert took == "True"
    assert default > 15 * pages, default
    assert kept < 3 * pages, (kept, default)
