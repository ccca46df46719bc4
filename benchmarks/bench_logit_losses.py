"""Benchmark the logit-KD losses (forward + backward) at classification and segmentation sizes.

    PYTHONPATH=. python benchmarks/bench_logit_losses.py [--device cpu|cuda] [--repeats 5] [--threads 1]
        [--out benchmarks/results/logit_losses.json]

Reports the median wall time per call (ms) and, for the MLKD batch term, the C x C identity
against the direct N x N computation where the latter fits (classification only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cmkd.losses import (
    batch_correlation_loss,
    class_correlation_loss,
    dkd_loss,
    kd_loss,
    non_target_divergence,
    target_divergence,
    to_rows,
)
from cmkd.methods.ntdh import NonTargetSampleMask
from cmkd.utils.atomic import write_json


def reference_dkd(s, t, y, alpha, beta, T):
    """mdistiller's formulation (one-hot masks, -1000 * gt before the NCKD softmax), for timing."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T**2 / y.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000 * gt, 1), F.softmax(t / T - 1000 * gt, 1),
                    reduction="sum") * T**2 / y.shape[0]
    return alpha * tckd + beta * nckd


def direct_batch_correlation(ps, pt):
    return (ps @ ps.T - pt @ pt.T).square().sum() / ps.shape[0]


def timed(fn, student, repeats, device):
    times = []
    for i in range(repeats + 1):
        student.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if out.requires_grad:
            out.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--out", default="benchmarks/results/logit_losses.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {"classification": (256, 100), "segmentation": (4, 20, 64, 512)}
    results = {"device": str(device), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "repeats": args.repeats,
               "load_average_1min_at_start": round(os.getloadavg()[0], 2), "ms_per_call_forward_backward": {}}
    for task, shape in shapes.items():
        s = torch.randn(shape, device=device, requires_grad=True)
        t = torch.randn(shape, device=device)
        target_shape = (shape[0], *shape[2:])
        y = torch.randint(0, shape[1], target_shape, device=device)
        y.view(-1)[::7] = -1
        valid = y >= 0
        rows_s, rows_t = lambda: F.softmax(to_rows(s), 1), F.softmax(to_rows(t), 1)
        w = valid.reshape(-1).float()
        r = 1 if len(shape) == 2 else shape[2] * shape[3]
        cases = {
            "kd_loss": lambda: kd_loss(s, t, 4.0, mask=valid),
            "dkd_loss": lambda: dkd_loss(s, t, y, 1.0, 8.0, 4.0, mask=valid),
            "target_divergence": lambda: target_divergence(s, t, y).sum(),
            "non_target_divergence": lambda: non_target_divergence(s, t, y).sum(),
            "ntdh_sample_mask (no grad)": lambda: NonTargetSampleMask(0.2)({"target": y}, s.detach(), t).sum(),
            "mlkd_batch_correlation (C x C identity)": lambda: batch_correlation_loss(rows_s(), rows_t, w, r),
            "mlkd_class_correlation": lambda: class_correlation_loss(rows_s(), rows_t, w, r),
        }
        if task == "classification":
            y_all = y.clamp_min(0)
            cases["dkd_reference_formulation"] = lambda: reference_dkd(s, t, y_all, 1.0, 8.0, 4.0)
            cases["mlkd_batch_correlation (direct N x N)"] = lambda: direct_batch_correlation(rows_s(), rows_t)
        results["ms_per_call_forward_backward"][f"{task} {list(shape)}"] = {
            name: round(timed(fn, s, args.repeats, device), 3) for name, fn in cases.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
