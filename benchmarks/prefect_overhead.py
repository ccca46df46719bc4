"""Benchmark: the Prefect pipeline flow's overhead over a bare `dvc repro` on an up-to-date
pipeline (target: under 5 s once the Prefect server is up).

    python benchmarks/prefect_overhead.py                  # replica of this repo's stage graph
    python benchmarks/prefect_overhead.py --repo PATH      # a real, already reproduced checkout
    python benchmarks/prefect_overhead.py --graph-from PATH  # replica of another project's graph
    [--repeats 5] [--out benchmarks/results/prefect_overhead.json]

What is timed, in one process and one session: the Prefect server is started first (the one at
PREFECT_API_URL if set, else a temporary local one) and warmed with one untimed flow run; then,
alternating, `python -m dvc repro` (a bare DVC command, as a user types it) and the flow
`cmkd-pipeline` called in this process, each on the same up-to-date pipeline. The overhead is
the difference of the medians. Both must find every stage up to date (checked).

By default the pipeline is a replica of this repository's DVC stage graph, read through DVC
from dvc.yaml and params.yaml (same stage names, same number, same dependency edges) with
trivial commands, so it can be brought up to date in seconds: the overhead depends on the graph
(one Prefect task per stage, DVC's per-stage checks), not on what the commands compute. With
`--repo`, a real checkout is measured as it is (run `dvc repro` there first).

Also recorded: the whole command line, `python -m flows.pipeline` (interpreter start, imports
of Prefect and DVC, the flow), against the same server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `flows` is not an installed package

from cmkd.utils.atomic import write_json  # noqa: E402
from flows.stage_graph import read_stage_plan  # noqa: E402

TARGET_S = 5.0


def _run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_replica(source: Path, dest: Path) -> int:
    """A DVC project with `source`'s stage graph (names, edges) and trivial commands."""
    plan = read_stage_plan(source)
    safe = {s.name: re.sub(r"[^A-Za-z0-9_-]", "_", s.name) for s in plan}
    py = shlex.quote(sys.executable)
    stages = {}
    for stage in plan:
        out = f"out/{safe[stage.name]}.txt"
        deps = [f"out/{safe[up]}.txt" for up in stage.upstream]
        stages[safe[stage.name]] = {
            "cmd": f"{py} -c \"open('{out}', 'w').write('{stage.name}')\"",
            **({"deps": deps} if deps else {}),
            "outs": [out],
        }
    dest.mkdir(parents=True)
    (dest / "out").mkdir()
    import yaml

    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (dest / "params.yaml").write_text("{}\n")
    _run(["git", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "repro", "-q"], dest)
    return len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="an up-to-date DVC checkout to measure as is")
    parser.add_argument("--graph-from", type=Path, default=REPO_ROOT,
                        help="DVC project whose stage graph the replica copies (default: this repo)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/prefect_overhead.json")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    with tempfile.TemporaryDirectory(prefix="cmkd-prefect-bench-") as tmp:
        if args.repo:
            repo, mode = args.repo.resolve(), "repository as is"
            n_stages = len(read_stage_plan(repo))
        else:
            source = args.graph_from.resolve()
            repo, mode = Path(tmp) / "replica", f"replica of the stage graph of {source}"
            n_stages = build_replica(source, repo)
        status = _run([sys.executable, "-m", "dvc", "status", "--json"], repo)
        if json.loads(status or "{}"):
            raise SystemExit(f"{repo} is not up to date (`dvc status`); run `dvc repro` there first")

        import contextlib

        from flows.pipeline import pipeline_flow

        if os.environ.get("PREFECT_API_URL"):
            server = contextlib.nullcontext()
            server_kind = "PREFECT_API_URL"
        else:
            from prefect.testing.utilities import prefect_test_harness

            server = prefect_test_harness(server_startup_timeout=180)
            server_kind = "temporary local server (prefect_test_harness)"
        with server:
            from prefect.settings import PREFECT_API_URL

            api_url = PREFECT_API_URL.value()
            pipeline_flow(repo=str(repo))  # warm: server, imports, DVC's state database
            _run([sys.executable, "-m", "dvc", "repro"], repo)
            dvc_times, flow_times = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = _run([sys.executable, "-m", "dvc", "repro"], repo)
                dvc_times.append(time.perf_counter() - t0)
                assert "Running stage" not in out, out
                t0 = time.perf_counter()
                result = pipeline_flow(repo=str(repo))
                flow_times.append(time.perf_counter() - t0)
                assert result["ran"] == [] and len(result["up_to_date"]) == n_stages, result
            cli_times = []
            env = {**os.environ, "PREFECT_API_URL": api_url}
            for _ in range(3):
                t0 = time.perf_counter()
                _run([sys.executable, "-m", "flows.pipeline", "--repo", str(repo)], REPO_ROOT, env)
                cli_times.append(time.perf_counter() - t0)

    import dvc
    import prefect

    dvc_median, flow_median = statistics.median(dvc_times), statistics.median(flow_times)
    overhead = flow_median - dvc_median
    result = {
        "what": "cmkd-pipeline flow vs bare `dvc repro` on an up-to-date pipeline, server up",
        "pipeline": mode,
        "stages": n_stages,
        "repeats": args.repeats,
        "server": server_kind,
        "dvc_repro_s": {"median": dvc_median, "all": dvc_times},
        "flow_s": {"median": flow_median, "all": flow_times},
        "overhead_s": overhead,
        "target_s": TARGET_S,
        "meets_target": overhead < TARGET_S,
        "cli_python_m_flows_pipeline_s": {"median": statistics.median(cli_times), "all": cli_times},
        # The whole command line (interpreter start, Prefect and DVC imports) over `dvc repro`.
        "cli_overhead_s": statistics.median(cli_times) - dvc_median,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_at_start,
                    "load_avg_1m_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"prefect": prefect.__version__, "dvc": dvc.__version__},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("stages", "dvc_repro_s", "flow_s", "overhead_s",
                                             "meets_target", "cli_overhead_s")},
                     indent=2))


if __name__ == "__main__":
    main()
