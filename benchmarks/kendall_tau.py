"""Benchmark: batched Kendall tau-b (cmkd.losses.kendall_tau, used by C2KD's OFSD) against a
per-row scipy loop (what the reference C2KD code does every training step).

    python benchmarks/kendall_tau.py [--device cpu|cuda] [--out benchmarks/results/kendall_tau.json]

Writes the median time per call for a classification batch (N rows, C classes) and a
segmentation batch (one row per pixel), and the largest absolute difference to scipy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from cmkd.losses import kendall_tau
from cmkd.utils.atomic import write_json


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/kendall_tau.json")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    results = {"device": str(device), "torch": torch.__version__, "machine": platform.machine(),
               "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0], "cases": []}
    for name, n, c in (("classification", 128, 10), ("classification", 128, 100),
                       ("segmentation_8x64x256", 8 * 64 * 256, 20)):
        a = torch.randn(n, c, generator=gen)
        b = a + torch.randn(n, c, generator=gen)
        a_dev, b_dev = a.to(device), b.to(device)

        def batched():
            kendall_tau(a_dev, b_dev)
            sync()

        batched()  # warm-up
        t_batched = _time(batched, 5)
        rows = min(n, 512)  # the loop is timed on a subset and scaled: it is linear in rows
        an, bn = a.numpy()[:rows], b.numpy()[:rows]
        t_loop = _time(lambda: [kendalltau(an[i], bn[i]) for i in range(rows)], 3) * n / rows
        ref = np.array([kendalltau(an[i], bn[i]).statistic for i in range(rows)])
        err = float(np.max(np.abs(kendall_tau(a[:rows], b[:rows]).numpy() - ref)))
        results["cases"].append({"case": name, "rows": n, "classes": c, "batched_s": t_batched,
                                 "scipy_loop_s": t_loop, "speedup": t_loop / t_batched, "max_abs_diff": err})
    write_json(Path(args.out), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
