"""Benchmark: what DVC spends on dvc.lock after every stage, for the lock files of two commits.

    python benchmarks/dvc_lock_cost.py [--before REV] [--repeats 7] [--out benchmarks/results/dvc_lock_cost.json]

After each stage `dvc repro` rewrites the whole lock file through ruamel's round-trip parser
(dvc/dvcfile.py `_dump_lockfile` -> dvc.utils.serialize `modify_yaml`), so its cost is paid
63 times in the default run and grows with the lock's length. This times that very call
(`modify_yaml` on a copy of the file, which parses and dumps it) for the lock of commit REV
(default HEAD~1) and the working tree's, interleaved so that changes of machine load hit both
alike; it reports the median and minimum seconds per rewrite and the number of lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cmkd.utils.atomic import write_json  # noqa: E402


def _rewrite_seconds(path: Path) -> float:
    from dvc.utils.serialize import modify_yaml

    start = time.perf_counter()
    with modify_yaml(path) as data:  # what DVC does to dvc.lock after each stage
        data["schema"] = data.get("schema", "2.0")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="HEAD~1", help="commit whose dvc.lock is 'before' (default HEAD~1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/dvc_lock_cost.json"))
    args = p.parse_args()
    before = subprocess.run(["git", "show", f"{args.before}:dvc.lock"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    texts = {"before": before, "after": (REPO / "dvc.lock").read_text()}
    times: dict[str, list[float]] = {name: [] for name in texts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, text in texts.items():
                path = Path(tmp) / f"{name}.lock"
                path.write_text(text)
                times[name].append(_rewrite_seconds(path))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "what": "seconds DVC spends rewriting dvc.lock once (dvc.utils.serialize.modify_yaml: ruamel round-trip "
                "parse + dump), as after every stage of `dvc repro`; interleaved repeats",
        "before_commit": subprocess.run(["git", "rev-parse", args.before], cwd=REPO, capture_output=True,
                                        text=True).stdout.strip(),
        "after_commit": head + " (working tree's dvc.lock)",
        "repeats": args.repeats,
        "results": {name: {"lines": len(texts[name].splitlines()),
                           "rewrite_s_median": round(statistics.median(ts), 3),
                           "rewrite_s_min": round(min(ts), 3)} for name, ts in times.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(args.out, result)
    for name, r in result["results"].items():
        print(f"{name:7s} {r['lines']:5d} lines  {r['rewrite_s_median']:.3f} s median  {r['rewrite_s_min']:.3f} s min")


if __name__ == "__main__":
    main()
