"""Runtime of the synthetic experiment stages (the `exp_*` stages of dvc.yaml) on this machine.

    PYTHONPATH=. python benchmarks/bench_experiments.py [names...] [--out benchmarks/results/experiments_runtime.json]

Runs each experiment with its params.yaml configuration, one torch thread (as the stages run),
and records wall time and this process's CPU time. On a shared machine the wall time grows with
the load; the CPU time is what a quiet machine would take, so both are recorded with the load
average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from cmkd.experiments.analysis import EXPERIMENTS, run_experiment
from cmkd.utils.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(EXPERIMENTS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/experiments_runtime.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    experiments = yaml.safe_load(Path(args.params).read_text())["experiments"]
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": 1}, "experiments": {}}
    for name in args.names:
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        run_experiment(name, experiments[name])
        entry = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
                 "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        report["experiments"][name] = entry
        print(name, entry, flush=True)
    report["total_cpu_s"] = round(sum(e["cpu_s"] for e in report["experiments"].values()), 1)
    report["total_wall_s"] = round(sum(e["wall_s"] for e in report["experiments"].values()), 1)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
