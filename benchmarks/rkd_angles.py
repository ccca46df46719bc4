"""Benchmark RKD's loss (forward + backward, student side with gradient) at the batch and
embedding sizes the default tables train with, against the authors' formulation of the angle
term (all N^2 difference vectors normalised, then one batched product: O(N^3 D)).

    PYTHONPATH=. python benchmarks/rkd_angles.py [--repeats 20] [--threads 1]
        [--out benchmarks/results/rkd_angles.json]

cmkd.losses builds the angles from the Gram matrix of the centred rows (O(N^3)), a block of
rows at a time; both give the same loss to float precision (tests/test_feature_losses.py checks
against a NumPy loop over triples). Reports the median ms per call and the largest relative
difference of the two losses over the cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from cmkd.utils.determinism import pin_cpu_kernels, provenance

pin_cpu_kernels()  # the stages' kernels (before torch is imported)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cmkd.losses import _mean_normalised_distances, rkd_loss  # noqa: E402
from cmkd.utils.atomic import write_json  # noqa: E402


def reference_rkd(s: torch.Tensor, t: torch.Tensor, wd: float = 25.0, wa: float = 50.0) -> torch.Tensor:
    """RKD as the authors' code computes it (normalised difference vectors, bmm)."""
    def angles(x):
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2))

    t = t.detach()
    return (wd * F.smooth_l1_loss(_mean_normalised_distances(s), _mean_normalised_distances(t))
            + wa * F.smooth_l1_loss(angles(s), angles(t)))


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # two warm-up calls
        x.grad = None
        start = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the stages train with 1)")
    parser.add_argument("--out", default="benchmarks/results/rkd_angles.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # (N, D_student, D_teacher): synthetic (batch 128, MLP 128), digits (batch 64, small_cnn 64),
    # and a larger batch
    shapes = [(128, 128, 128), (64, 64, 64), (256, 128, 128)]
    results = {"provenance": provenance(), "machine": platform.processor() or platform.machine(),
               "repeats": args.repeats,
               "load_average_1min_at_start": round(os.getloadavg()[0], 2), "cases": {}}
    worst = 0.0
    for n, ds, dt in shapes:
        s = torch.randn(n, ds).relu().requires_grad_(True)
        t = torch.randn(n, dt).relu()
        ours, ref = rkd_loss(s, t).item(), reference_rkd(s, t).item()
        worst = max(worst, abs(ours - ref) / abs(ref))
        case = {"cmkd_ms": round(timed(lambda: rkd_loss(s, t), s, args.repeats), 2),
                "authors_formulation_ms": round(timed(lambda: reference_rkd(s, t), s, args.repeats), 2)}
        case["speedup"] = round(case["authors_formulation_ms"] / case["cmkd_ms"], 2)
        results["cases"][f"N={n} D_s={ds} D_t={dt}"] = case
    results["max_relative_loss_difference"] = worst
    write_json(args.out, results)  # atomically, creating the folder
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
