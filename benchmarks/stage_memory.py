"""Benchmark: peak memory (RSS) of every stage, and the wall time, of a pipeline run.

    python benchmarks/stage_memory.py --datasets semantickitti-sample      # default methods
    python benchmarks/stage_memory.py --datasets sunrgbd-sample synthetic
    [--out benchmarks/results/stage_memory.json] [--keep DIR]

The pipeline (this checkout's cmkd/, stages/, dvc.yaml, params.yaml with `datasets` replaced)
is copied into a temporary DVC project and `dvc repro check_tables@<ds> diagnosis_report@<ds>` runs there for each
dataset, one after the other (each stage a child process).
Every 0.2 s the process tree is sampled; a stage's memory is the summed RSS of its process
and all its descendants (the forked seed workers), and its peak is the largest such sum seen.
So short peaks between samples can be missed, and shared pages of forked workers count once
per worker (an upper bound). Also recorded: each dataset's wall time from `dvc repro` start
to end (download to the claims check), each stage's wall time (first to last sample of its
process), CMKD_SEED_WORKERS as set, the load average, and the table's TEACHER, STUDENT and chance
(`judgeability`: whether the sample can teach at this cost). The committed dvc.lock is copied in,
as after the default run (`--no-lock`: start without it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
# dvc.lock too: DVC parses and rewrites the whole lock after every stage, so a sample run after
# the default run (the committed lock, ~60 stage entries) pays for its length; the entries of
# the default datasets' stages stay in it while `datasets` names only the sample.
FILES = ["cmkd", "stages", "dvc.yaml", "dvc.lock", "params.yaml", "claims.yaml", "tuned.yaml",
         "diagnosis_predictor.json"]


def stage_label(cmdline: list[str]) -> str | None:
    """`python -m stages train --dataset d --run r` -> 'train --dataset d --run r'."""
    if "-m" in cmdline:
        i = cmdline.index("-m")
        if i + 1 < len(cmdline) and cmdline[i + 1] == "stages":
            return " ".join(cmdline[i + 2:])
    return None


class Sampler(threading.Thread):
    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root = root_pid
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self.seen: dict[str, list[float]] = {}  # label -> [first, last] sample time
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                tree = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                try:
                    label = stage_label(proc.cmdline())
                    if label is None or (proc.parent() and stage_label(proc.parent().cmdline()) is not None):
                        continue  # count each stage once, from its top process
                    rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
                self.peaks[label] = max(self.peaks.get(label, 0.0), rss / 2**20)
                now = time.perf_counter()
                self.seen.setdefault(label, [now, now])[1] = now
            self.stop.wait(self.interval)


def judgeability_of(work: Path, ds: str) -> dict | None:
    """TEACHER, STUDENT and chance on test from the run's table (data/reports/<ds>/metrics.json),
    so the record says whether the sample could teach at the cost it measured."""
    path = work / "data" / "reports" / ds / "metrics.json"
    if not path.exists():
        return None
    j = json.loads(path.read_text()).get("judgeability") or {}
    return {k: (round(j[k], 4) if isinstance(j.get(k), float) else j.get(k))
            for k in ("metric", "teacher", "student", "chance", "judgeable")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/stage_memory.json"))
    p.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    p.add_argument("--no-lock", action="store_true", help="do not copy the committed dvc.lock")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cmkd-stage-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if name == "dvc.lock" and args.no_lock:
            continue
        src = REPO / name
        (shutil.copytree(src, work / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy2(src, work / name))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=work, env=env, check=True)
    results = {}
    try:
        for ds in args.datasets:
            params = yaml.safe_load((work / "params.yaml").read_text())
            params["datasets"] = [ds]
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            subprocess.run(["git", "add", "-A"], cwd=work, check=True)
            subprocess.run([*git, "commit", "-qm", ds], cwd=work, check=True)
            lock = work / "dvc.lock"
            lock_lines = len(lock.read_text().splitlines()) if lock.exists() else 0
            load = os.getloadavg()
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", f"check_tables@{ds}",
                                     f"diagnosis_report@{ds}"], cwd=work, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            sampler = Sampler(proc.pid)
            sampler.start()
            output, _ = proc.communicate()
            seconds = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
            results[ds] = {
                "returncode": proc.returncode, "seconds": round(seconds, 1),
                "peak_rss_mib": {k: round(v, 1) for k, v in sorted(sampler.peaks.items(), key=lambda kv: -kv[1])},
                "stage_seconds": {k: round(v[1] - v[0], 1) for k, v in sampler.seen.items()},
                "lock_lines_at_start": lock_lines,
                "load_average_at_start": [round(x, 2) for x in load],
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "output_tail": output.splitlines()[-15:] if proc.returncode else [],
                "judgeability": judgeability_of(work, ds),
            }
            top = next(iter(results[ds]["peak_rss_mib"].items()), ("-", 0))
            print(f"{ds}: exit {proc.returncode}, {seconds:.0f} s, "
                  f"largest stage {top[1]:.0f} MiB ({top[0]})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    record = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "seed_workers": os.environ.get("CMKD_SEED_WORKERS", "unset (cores and memory)"),
              "datasets": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
