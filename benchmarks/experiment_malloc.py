"""The experiment stages with glibc's default allocator against the heap that keeps freed memory
(`cmkd.utils.parallel.keep_freed_memory`, called by stages/experiment.py).

    PYTHONPATH=. python benchmarks/experiment_malloc.py [names...] [--repeats 1] [--out benchmarks/results/experiment_malloc.json]

Each measurement is the real stage (`python -m stages experiment <name>`) in a child process,
writing to a temporary folder; the `default` child replaces keep_freed_memory with a no-op
before the stage imports it. The children run alternately (default, kept, default, ...) so a
change in the machine's load hits both alike. Recorded per child from os.wait4: wall, user and
system CPU seconds, minor page faults and peak RSS; and the md5 of every file the stage wrote,
so the report shows whether the outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmkd.utils.atomic import write_json  # noqa: E402

# The child: the stage as `python -m stages experiment <name>` runs it, optionally without the
# allocator settings (patched before stages.experiment imports the name).
CHILD = """
import runpy, sys
mode, name, out = sys.argv[1:4]
if mode == "default":
    import cmkd.utils.parallel
    cmkd.utils.parallel.keep_freed_memory = lambda *args, **kwargs: False
sys.argv = ["stages", "experiment", name, "--out-dir", out]
runpy.run_module("stages", run_name="__main__", alter_sys=True)
"""


def measure(mode: str, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="exp-malloc-") as out:
        env = dict(os.environ, PYTHONPATH=str(ROOT), CMKD_LOG_LEVEL="WARNING")
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, name, out], cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} {name}: the stage exited with {proc.returncode}")
        outputs = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(Path(out).iterdir())}
    return {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "minor_faults": usage.ru_minflt, "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["ntdh_gap", "digits_noise"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/experiment_malloc.json")
    args = ap.parse_args()
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "libc": platform.libc_ver()},
              "load_before": round(os.getloadavg()[0], 2), "experiments": {}}
    for name in args.names:
        runs: dict[str, list[dict]] = {"default": [], "kept": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(measure(mode, name))
                print(name, mode, {k: v for k, v in runs[mode][-1].items() if k != "outputs"}, flush=True)
        summary = {mode: {key: statistics.median(r[key] for r in rs)
                          for key in ("wall_s", "user_s", "sys_s", "minor_faults", "max_rss_mb")}
                   for mode, rs in runs.items()}
        outputs = {mode: rs[0]["outputs"] for mode, rs in runs.items()}
        summary["identical_outputs"] = all(r["outputs"] == outputs["default"] for rs in runs.values() for r in rs)
        summary["wall_speedup"] = round(summary["default"]["wall_s"] / summary["kept"]["wall_s"], 2)
        summary["runs"] = runs
        report["experiments"][name] = summary
    report["load_after"] = round(os.getloadavg()[0], 2)
    write_json(ROOT / args.out, report)


if __name__ == "__main__":
    main()
