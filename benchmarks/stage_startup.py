"""Benchmark: what a stage spends importing, per stage kind, before and after the lazy imports.

    python benchmarks/stage_startup.py [--before REV] [--repeats 2] [--out benchmarks/results/stage_startup.json]

Every DVC stage is a process of its own (`python -m stages <name> ...`), so the imports it
does are paid once per stage: ~50 times in the default `dvc repro`. For each stage kind, the
stage is run for real on a tiny synthetic pipeline (as the tests' tiny params) with
`python -X importtime`, and the import seconds are the sum of the top-level imports' cumulative
times over the whole run (lazy imports during the run included). The stage's wall time is
recorded too. "before" is the code of commit REV (default: the merge base with main, i.e.
this branch's starting point), "after" the working tree; both run as plain processes
(CMKD_STAGE_SERVER=0: the stage server is an opt-in mode now) with one seed worker. The
minimum over `--repeats` runs is reported (the machine may be shared; the minimum is the cost
itself, the rest is waiting for a core), the median beside it, and the CPU seconds (user +
sys) of each stage process, which a loaded machine inflates much less than wall times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import PIPELINE_FILES, tiny_params  # noqa: E402

# (kind, stage arguments): in pipeline order, each needs the outputs of the ones before.
STAGES = [
    ("download", ["download", "--dataset", "synthetic"]),
    ("prepare", ["prepare", "--dataset", "synthetic"]),
    ("train_teacher", ["train", "--dataset", "synthetic", "--role", "teacher", "--no-progress"]),
    ("train_student", ["train", "--dataset", "synthetic", "--role", "student", "--no-progress"]),
    ("distill", ["train", "--dataset", "synthetic", "--run", "kdv1", "--no-progress"]),
    ("evaluate", ["evaluate", "--dataset", "synthetic"]),
]
# Top-level packages whose import seconds are reported one by one.
WATCHED = ("torch", "torchmetrics", "sklearn", "scipy", "matplotlib", "dvclive", "h5py", "yaml", "PIL", "tqdm")


def import_seconds(stderr: str) -> tuple[float, dict[str, float]]:
    """Sum of the top-level imports' cumulative times, and per watched package (first import)."""
    total, per = 0.0, {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        seconds = int(cumulative) / 1e6
        if depth == 0:
            total += seconds
        top = name.strip().split(".")[0]
        if name.strip() == top and top in WATCHED and top not in per:
            per[top] = seconds
    return total, per


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def checkout(rev: str | None, dest: Path) -> Path:
    """The pipeline files of commit `rev` (or of the working tree) in `dest`."""
    dest.mkdir(parents=True)
    if rev is None:
        import shutil

        for name in PIPELINE_FILES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, dest / name)
        return dest
    data = subprocess.run(["git", "archive", rev, *PIPELINE_FILES], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def measure(root: Path, repeats: int) -> dict[str, dict]:
    params = tiny_params(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(root), "CMKD_STAGE_SERVER": "0", "CMKD_SEED_WORKERS": "1",
           "CMKD_LOG_LEVEL": "WARNING", "DVC_NO_ANALYTICS": "1"}
    runs: dict[str, list[tuple[float, float, dict, float]]] = {kind: [] for kind, _ in STAGES}
    for _ in range(repeats):
        for kind, args in STAGES:
            t0, cpu0 = time.perf_counter(), _children_cpu()
            proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages", *args], cwd=root, env=env,
                                  capture_output=True, text=True)
            wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
            if proc.returncode != 0:
                raise SystemExit(f"{kind} failed in {root}:\n{proc.stderr[-3000:]}")
            total, per = import_seconds(proc.stderr)
            runs[kind].append((total, wall, per, cpu))
    out = {}
    for kind, rows in runs.items():
        best = min(rows, key=lambda r: r[0])
        out[kind] = {
            "import_s_min": round(best[0], 3),
            "import_s_median": round(statistics.median(r[0] for r in rows), 3),
            "wall_s_min": round(min(r[1] for r in rows), 3),
            # CPU seconds (user + sys) of the whole stage process: the computation is the same
            # before and after, so the difference is start-up; unlike wall times, it does not
            # grow with the load of a shared machine.
            "cpu_s_min": round(min(r[3] for r in rows), 3),
            "imported_packages_s": {k: round(v, 3) for k, v in sorted(best[2].items())},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="commit of the 'before' code (default: merge base with main)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "stage_startup.json"))
    args = ap.parse_args()
    before = args.before or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="cmkd-startup-") as tmp:
        results = {"before": measure(checkout(before, Path(tmp) / "before"), args.repeats),
                   "after": measure(checkout(None, Path(tmp) / "after"), args.repeats)}
    saved = {kind: {"cpu_s": round(results["before"][kind]["cpu_s_min"] - results["after"][kind]["cpu_s_min"], 3),
                    "import_s": round(results["before"][kind]["import_s_min"] - results["after"][kind]["import_s_min"], 3)}
             for kind, _ in STAGES}
    report = {
        "what": "seconds a stage spends importing (sum of top-level -X importtime cumulative times over the "
                "whole stage run), plain process, tiny synthetic pipeline; min over repeats",
        "before_commit": before,
        "repeats": args.repeats,
        "results": results,
        "saved_per_stage": saved,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"saved_per_stage": saved}, indent=2))


if __name__ == "__main__":
    main()
