"""Run the benchmarks (benchmarks/README.md says what each measures), one child process each.

    python benchmarks/run_all.py                 # every benchmark at its own size -> benchmarks/results/
    python benchmarks/run_all.py --quick         # reduced sizes -> benchmarks/results/quick/ (not committed)
    python benchmarks/run_all.py --only loader rkd_angles [--quick]
    make bench ARGS=--quick

A benchmark whose tool or input is missing (qemu-user, a CUDA device, the pipeline's prepared data)
is skipped with the reason; one that fails is reported and the others still run. A full run takes
hours on 2 cores (`stage_memory` and `default_run` reproduce whole pipelines); `--quick` checks
that every script still runs, in minutes, and its numbers are not measurements: it writes them
apart so that the committed results are not replaced. The exit status is 1 when one failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _cuda() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return None if probe.stdout.strip() == "True" else "no CUDA device (tests/test_gpu_check.py runs its CPU mode)"


def _prepared(*datasets: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [ds for ds in datasets if not (ROOT / "data" / "prepared" / f"{ds}.h5").is_file()]
        return f"needs data/prepared/{{{','.join(missing)}}}.h5 (dvc repro prepare@<dataset>)" if missing else None
    return check


def _diagnosis_inputs() -> str | None:
    runs = ROOT / "data" / "runs" / "synthetic"
    missing = _prepared("synthetic")()
    if missing is None and not all((runs / role / "metrics.json").is_file() for role in ("teacher", "student")):
        missing = "needs data/runs/synthetic/{teacher,student} (dvc repro train_student@synthetic)"
    return missing


def _qemu() -> str | None:
    if shutil.which("qemu-x86_64") is None:
        return "qemu-x86_64 not installed (Debian: apt-get install qemu-user)"
    return _prepared("synthetic", "digits")()


@dataclass
class Benchmark:
    name: str
    script: str
    results: str  # file name under the output folder
    full: list[str] = field(default_factory=list)  # arguments of the full run
    quick: list[str] | None = field(default_factory=list)  # of the quick run; None: full run only
    requires: Callable[[], str | None] = lambda: None  # the reason it cannot run here, or None


BENCHMARKS = [
    Benchmark("logit_losses", "bench_logit_losses.py", "logit_losses.json", quick=["--repeats", "1"]),
    Benchmark("rkd_angles", "rkd_angles.py", "rkd_angles.json", quick=["--repeats", "2"]),
    Benchmark("kendall_tau", "kendall_tau.py", "kendall_tau.json"),
    Benchmark("method_steps", "method_steps.py", "method_steps.json",
              quick=["--steps", "5", "--datasets", "synthetic"]),
    Benchmark("loader", "loader.py", "loader.json",
              quick=["--rows", "32", "--steps", "2", "--workers", "0", "1", "--simulated-step-s", "0.05"]),
    Benchmark("cpu_pinning", "cpu_pinning.py", "cpu_pinning.json", quick=["--rounds", "1", "--steps", "30"]),
    Benchmark("experiments", "bench_experiments.py", "experiments_runtime.json", quick=["mfh_gamma"]),
    Benchmark("tuning_cost", "tuning_cost.py", "tuning_cost.json"),
    Benchmark("diagnosis_cost", "diagnosis_cost.py", "diagnosis_cost.json", full=["synthetic"], quick=["synthetic"],
              requires=_diagnosis_inputs),
    Benchmark("prepare_kitti", "prepare_kitti.py", "prepare_kitti.json", quick=["--scans", "8", "--workers", "1"]),
    Benchmark("sunrgbd_prepare", "sunrgbd_prepare.py", "sunrgbd_prepare.json", quick=["--frames-per-class", "1"]),
    Benchmark("prefect_overhead", "prefect_overhead.py", "prefect_overhead.json", quick=["--repeats", "1"]),
    Benchmark("stage_memory", "stage_memory.py", "stage_memory.json",
              full=["--datasets", "semantickitti-sample", "sunrgbd-sample", "nyudv2-sample"], quick=None),
    Benchmark("default_run", "default_run.py", "default_run.json", quick=None),
    Benchmark("portability", "portability.py", "portability.json",
              quick=["--cpus", "Haswell-v4", "--seeds", "0", "--runs", "kdv1"], requires=_qemu),
    Benchmark("gpu_check", "gpu_check.py", "gpu_check.json", quick=["--steps", "2", "--warmup", "1"], requires=_cuda),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes, results under benchmarks/results/quick/")
    p.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], metavar="NAME",
                   help=f"these benchmarks only ({', '.join(b.name for b in BENCHMARKS)})")
    p.add_argument("--out-dir", type=Path,
                   help="results folder (default: benchmarks/results, or its quick/ with --quick)")
    args = p.parse_args()
    out_dir = (args.out_dir or (RESULTS / "quick" if args.quick else RESULTS)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    outcome: dict[str, str] = {}
    bar = tqdm(chosen, desc="benchmarks", unit="bench")
    for bench in bar:
        bar.set_postfix_str(bench.name)
        if args.quick and bench.quick is None:
            outcome[bench.name] = "skipped: full run only (it reproduces whole pipelines)"
            continue
        reason = bench.requires()
        if reason:
            outcome[bench.name] = f"skipped: {reason}"
            continue
        results = out_dir / bench.results
        cmd = [sys.executable, str(ROOT / "benchmarks" / bench.script), *(bench.quick if args.quick else bench.full),
               "--out", str(results)]
        tqdm.write(f"--- {bench.name}: {' '.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            outcome[bench.name] = f"FAILED (exit status {proc.returncode}) after {seconds:.0f} s"
        elif not results.is_file():
            outcome[bench.name] = f"FAILED: exited 0 but wrote no {results}"
        else:
            shown = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
            outcome[bench.name] = f"ok in {seconds:.0f} s -> {shown}"
    print("\nbenchmarks:")
    for name, line in outcome.items():
        print(f"  {name:17s} {line}")
    return 1 if any(line.startswith("FAILED") for line in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
