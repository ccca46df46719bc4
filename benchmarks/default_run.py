"""The README's pipeline facts: how many stages the default pipeline has, and how long the
default run takes per dataset (measured, not estimated).

    python benchmarks/default_run.py --count            # stage counts only (seconds)
    python benchmarks/default_run.py                    # count, then time every part (a full
                                                        # default run: ~8 min on 2 cores)
    [--repo .] [--out benchmarks/results/default_run.json]

Timing: for each dataset of params.yaml `dvc repro --force check_tables@<dataset>` (download,
prepare, teachers, students, every distill run, evaluate, its claims check; `method_code` too,
well under a second), then `dvc repro --force check` (the synthetic experiments and their
claims). Each part is one wall-clock measurement on whatever the machine is doing: record
what else ran beside it (`--note`). CMKD_SEED_WORKERS is left as the environment has it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def stage_names(repo: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def count(names: list[str], datasets: list[str]) -> dict:
    """Total, per stage kind (`distill`, `evaluate`, ...) and per dataset (stages named after it)."""
    kinds = Counter(name.split("@")[0] for name in names)
    per_dataset = {}
    for ds in datasets:
        per_dataset[ds] = sum(1 for n in names
                              if "@" in n and (n.split("@")[1] == ds or n.split("@")[1].startswith(ds + "-")))
    return {"total": len(names), "per_kind": dict(sorted(kinds.items())), "per_dataset": per_dataset}


def timed_repro(repo: Path, target: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", target], cwd=repo, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=".")
    p.add_argument("--count", action="store_true", help="only count the stages")
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    p.add_argument("--out", default="benchmarks/results/default_run.json")
    args = p.parse_args()
    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))
    from cmkd.config import load_params

    datasets = load_params(repo / "params.yaml")["datasets"]
    facts = count(stage_names(repo), datasets)
    print(f"stages: {facts['total']} ({', '.join(f'{k} {v}' for k, v in facts['per_kind'].items())})")
    for ds, n in facts["per_dataset"].items():
        print(f"  {ds}: {n} stages named after it")
    if args.count:
        return 0
    seconds = {}
    for ds in datasets:
        seconds[f"check_tables@{ds}"] = round(timed_repro(repo, f"check_tables@{ds}"), 1)
        print(f"{ds}: {seconds[f'check_tables@{ds}']:.0f} s")
    seconds["check"] = round(timed_repro(repo, "check"), 1)
    print(f"experiments + check: {seconds['check']:.0f} s")
    total = sum(seconds.values())
    print(f"total: {total:.0f} s ({int(total // 60)} min {total % 60:.0f} s)")
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "seed_workers": os.environ.get("CMKD_SEED_WORKERS", "unset (one per core)"),
              "note": args.note, "stages": facts, "seconds": seconds, "total_seconds": round(total, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
