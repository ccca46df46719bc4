"""Prefect flow `cmkd-sweep`: a parameter grid run as parallel DVC experiments.

    python -m flows.sweep --methods kdv1 kdv2 --seeds 0 1 --jobs 2
    python -m flows.sweep --datasets synthetic --gammas 0 0.5 1 --dask-address tcp://10.0.0.5:8786
    python -m flows.sweep --help

Every grid point (datasets x methods x seeds x gammas; each dimension optional, each point
sets `datasets: [d]`, `methods: [m]`, `seeds: [s]`, `<gamma-key>: g`) is one
`dvc exp run --temp -n <name> -S ...` in its own Prefect task:

* Why `--temp` per point rather than DVC's queue (`--queue` + `--run-all -j N`): the queue runs
  its experiments in DVC's own local worker processes, which Prefect can neither place on a
  Dask cluster nor retry, log or show one by one. `--temp` runs one experiment in a private copy
  of the workspace (DVC's shared cache and run cache included) and records it as an experiment
  of the current commit, so N of them side by side are independent: verified with concurrent
  runs, as DVC takes its repo lock (we pass `--wait-for-lock`) only to create and collect the
  copy. The workspace itself is never touched.
* Workers: a thread pool of `jobs` on this machine by default; with `dask_address`, the tasks
  run on that existing Dask cluster (prefect-dask's DaskTaskRunner). Dask workers must see this
  repository at the same path (a shared file system) with the same environment, since a task
  runs `dvc exp run` in it.
* Results: after every point, `dvc exp show --json` (DVC's documented output, per metrics file)
  gives each experiment's metrics; their numbers are flattened into one table, one row per grid
  point (`rows.<method>.f1_weighted.mean`, `rows.student.f1_weighted.mean`, ...: see
  `metric_columns`), written as Markdown and CSV (default `data/sweeps/<sweep>/results.*`)
  and published as the Prefect artifact `cmkd-sweep`. The experiments stay in
  `dvc exp show` (`dvc exp show --keep '<sweep>-.*'`), and `dvc exp apply <name>` restores one.
* Stages shared by all points (download, prepare, the teacher) come from DVC's run cache when
  they ran before: run the pipeline once first, or concurrent points compute them twice.
* Only git-tracked files (committed or not) are copied into an experiment: `git add` new
  scripts first (the flow warns about untracked files).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from cmkd.errors import CmkdError, ConfigError
from flows.dvc_cli import DvcCommandError, dvc_args, run_json, run_streaming
from flows.overrides import (
    build_overrides,
    check_not_interrupted,
    parse_assignment,
    require_git_commit,
    validate_overrides,
    workspace_lock,
)
from flows.reports import flatten, markdown_table, write_table
from flows.temporary_server import stop_temporary_server_on_termination

DEFAULT_GAMMA_KEY = "data.synthetic.gamma"
ARTIFACT_KEY = "cmkd-sweep"
POINT_COLUMNS = ("experiment", "dataset", "method", "seed", "gamma", "status")


class ExperimentFailedError(CmkdError):
    """`dvc exp run` of one grid point failed; the message ends with its last output lines."""

    def __init__(self, name: str, returncode: int, output_tail: str):
        self.name = name
        super().__init__(f"experiment {name!r} failed (dvc exp run exit code {returncode}):\n"
                         f"{output_tail}")


class SweepFailedError(CmkdError):
    def __init__(self, failed: dict[str, str], table: Path | None):
        self.failed = failed
        where = f"; the other points' results are in {table}" if table else ""
        details = "\n".join(f"--- {name} ---\n{error}" for name, error in failed.items())
        super().__init__(f"{len(failed)} grid point(s) failed{where}:\n{details}")


def grid_points(datasets: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None,
                gammas: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The cartesian product of the given dimensions, as {"dataset": .., "method": .., ...}."""
    dims = {"dataset": datasets, "method": methods, "seed": seeds, "gamma": gammas}
    given = {name: list(values) for name, values in dims.items() if values is not None}
    for name, values in given.items():
        if not values:
            raise ConfigError(f"{name}s", "an empty list gives an empty grid")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{name}s", f"repeated values in {values}")
    if not given:
        raise ConfigError("grid", "give at least one of datasets, methods, seeds, gammas")
    return [dict(zip(given, combo)) for combo in itertools.product(*given.values())]


def point_name(sweep: str, point: dict[str, Any]) -> str:
    """`<sweep>-<dataset>-<method>-s<seed>-g<gamma>`, safe as a git ref name."""
    parts = [sweep]
    for key, prefix in (("dataset", ""), ("method", ""), ("seed", "s"), ("gamma", "g")):
        if key in point:
            parts.append(prefix + re.sub(r"[^A-Za-z0-9_]+", "_", str(point[key])))
    return "-".join(parts)


def point_overrides(params_file: Path, point: dict[str, Any], gamma_key: str,
                    params: dict[str, Any] | None) -> list[str]:
    """The `-S` overrides of one grid point, validated against params.yaml (a bad key or
    value fails here, before any experiment starts, not once per point later)."""
    if "gamma" in point and gamma_key in (params or {}):
        raise ConfigError(gamma_key, "set twice (by gammas and by params)")
    overrides = build_overrides(
        params_file,
        datasets=[point["dataset"]] if "dataset" in point else None,
        methods=[point["method"]] if "method" in point else None,
        seeds=[point["seed"]] if "seed" in point else None,
        params={**({gamma_key: point["gamma"]} if "gamma" in point else {}), **(params or {})},
    )
    validate_overrides(params_file, overrides)
    return overrides


@task(name="dvc-experiment", task_run_name="{name}", cache_policy=NO_CACHE)
def run_experiment(repo_root: str, name: str, overrides: list[str]) -> str:
    """`dvc exp run --temp -n <name> -S ...`, its output streamed into the task's log."""
    logger = get_run_logger()
    args = dvc_args("exp", "run", "--temp", "-n", name)
    for override in overrides:
        args += ["-S", override]
    logger.info("$ dvc exp run --temp -n %s %s (attempt %d)", name,
                " ".join(f"-S {o}" for o in overrides), max(1, task_run.run_count))
    result = run_streaming(args, repo_root, lambda line: logger.info("%s", line))
    if result.returncode != 0:
        raise ExperimentFailedError(name, result.returncode, result.output_tail)
    logger.info("%s: done in %.1f s", name, result.seconds)
    return name


def experiment_results(repo_root: str | Path, baseline: str) -> dict[str, dict]:
    """name -> {"params": {file: {...}}, "metrics": {file: {...}}} for `baseline`'s experiments."""
    shown = run_json(dvc_args("exp", "show", "--json", "--rev", baseline), repo_root)
    results = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name"):
                    results[rev["name"]] = {
                        "params": {f: (v or {}).get("data", {}) for f, v in (data.get("params") or {}).items()},
                        "metrics": {f: (v or {}).get("data", {}) for f, v in (data.get("metrics") or {}).items()},
                    }
    return results


def metric_columns(metrics: dict[str, dict], method: str | None = None) -> dict[str, Any]:
    """One row's numeric metrics, flattened (`rows.kdv1.f1_weighted.mean`).

    Keys seen in two metrics files are prefixed with their file. When the grid point fixes a
    method, a key segment equal to its name becomes `<method>`, so every point's own result
    lands in the same columns (`rows.<method>.f1_weighted.mean`) next to the shared ones
    (`rows.student...`). Text and list values (per-seed values) stay in `dvc exp show`.
    """
    flat = {path: flatten(data) for path, data in metrics.items()}
    counts: dict[str, int] = {}
    for values in flat.values():
        for key in values:
            counts[key] = counts.get(key, 0) + 1
    out = {}
    for path, values in sorted(flat.items()):
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if method is not None:
                key_out = ".".join("<method>" if part == method else part for part in key.split("."))
            else:
                key_out = key
            out[key_out if counts[key] == 1 else f"{path}:{key_out}"] = value
    return out


def _untracked(root: Path) -> list[str]:
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True, check=False)
    return proc.stdout.split()


@flow(name="cmkd-sweep")
def sweep_flow(
    repo: str = ".",
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    gammas: list[float] | None = None,
    gamma_key: str = DEFAULT_GAMMA_KEY,
    params: dict[str, Any] | None = None,
    jobs: int = 2,
    dask_address: str | None = None,
    retries: int = 1,
    retry_backoff_s: float = 10.0,
    sweep_name: str | None = None,
    output_dir: str | None = None,
) -> dict:
    """Run every grid point as a DVC experiment; return the results table.

    Args:
        repo: the DVC project.
        datasets, methods, seeds, gammas: the grid's dimensions (each optional).
        gamma_key: params.yaml key each gamma value is written to.
        params: overrides applied to every point (dotted key -> value).
        jobs: experiments at once on local threads (ignored with dask_address).
        dask_address: scheduler of an existing Dask cluster to run the experiments on.
        retries, retry_backoff_s: extra attempts per failed point; first delay, doubled each time.
        sweep_name: prefix of the experiment names (default sweep-<date>-<time>).
        output_dir: where results.md / results.csv go (default data/sweeps/<sweep_name>).
    """
    logger = get_run_logger()
    if jobs < 1:
        raise ConfigError("jobs", "must be at least 1")
    root = Path(repo).resolve()
    points = grid_points(datasets, methods, seeds, gammas)
    sweep = sweep_name or dt.datetime.now().strftime("sweep-%Y%m%d-%H%M%S")
    params_file = root / "params.yaml"
    per_point = []
    for point in points:
        overrides = point_overrides(params_file, point, gamma_key, params)
        per_point.append((point, point_name(sweep, point), overrides))
    require_git_commit(root)
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    if untracked := _untracked(root):
        logger.warning("untracked files are not copied into the experiments (git add them "
                       "if stages need them): %s", " ".join(untracked[:20]))
    experiment_task = run_experiment.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s)(retries)
        if retries else 0,
    )
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address)
        logger.info("%d experiments on the Dask cluster at %s", len(per_point), dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=jobs)
        logger.info("%d experiments, %d at a time", len(per_point), jobs)
    with workspace_lock(root):
        check_not_interrupted(root)
        with runner:
            futures = [runner.submit(experiment_task, parameters={
                "repo_root": str(root), "name": name, "overrides": overrides})
                for _, name, overrides in per_point]
            wait(futures)
        failed = {}
        for (_, name, _), future in zip(per_point, futures):
            if not future.state.is_completed():
                failed[name] = str(future.result(raise_on_failure=False))
        results = experiment_results(root, baseline)
    rows: list[dict] = []
    metric_names: set[str] = set()
    for point, name, _ in per_point:
        row = {"experiment": name, **point, "status": "failed" if name in failed else "done"}
        if name not in failed:
            values = metric_columns(results.get(name, {}).get("metrics", {}), point.get("method"))
            metric_names.update(values)
            row.update(values)
        rows.append(row)
    columns = [c for c in POINT_COLUMNS if any(c in r for r in rows)] + sorted(metric_names)
    out_dir = Path(output_dir) if output_dir else root / "data" / "sweeps" / sweep
    md_path, csv_path = write_table(out_dir, "results", columns, rows)
    create_markdown_artifact(
        f"# cmkd sweep `{sweep}`\n\n{len(rows)} grid points; experiments of commit "
        f"`{baseline[:10]}` (`dvc exp show`).\n\n" + markdown_table(columns, rows),
        key=ARTIFACT_KEY, description=f"cmkd sweep {sweep}: one row per grid point",
    )
    logger.info("results: %s, %s", md_path, csv_path)
    if failed:
        raise SweepFailedError(failed, md_path)
    return {"sweep": sweep, "baseline": baseline, "columns": columns, "rows": rows,
            "markdown": str(md_path), "csv": str(csv_path)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description="Run a grid (datasets x methods x seeds x gammas, each optional) as "
        "parallel DVC experiments (`dvc exp run --temp`), on local threads or an existing "
        "Dask cluster, and collect one results table (Markdown + CSV).",
        epilog="Each point sets params.yaml `datasets: [d]`, `methods: [m]`, `seeds: [s]` and "
        "the gamma key for its experiment only; your workspace is not modified. "
        "See the experiments with `dvc exp show`.",
    )
    parser.add_argument("--repo", default=".", help="DVC project root (default: .)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME")
    parser.add_argument("--methods", nargs="+", metavar="RUN", help="runs of params `runs`")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED")
    parser.add_argument("--gammas", nargs="+", type=float, metavar="GAMMA")
    parser.add_argument("--gamma-key", default=DEFAULT_GAMMA_KEY,
                        help=f"params key for gamma (default {DEFAULT_GAMMA_KEY})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every point, value read as YAML; repeatable")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="experiments at once on local threads (default 2)")
    parser.add_argument("--dask-address", metavar="ADDRESS",
                        help="run on this existing Dask scheduler (e.g. tcp://host:8786) instead")
    parser.add_argument("--retries", type=int, default=1, help="extra attempts per failed point (default 1)")
    parser.add_argument("--retry-backoff", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--name", help="sweep name, the experiments' prefix (default sweep-<time>)")
    parser.add_argument("--output-dir", help="results folder (default data/sweeps/<name>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = dict(parse_assignment(text) for text in args.sets)
        for point in grid_points(args.datasets, args.methods, args.seeds, args.gammas):
            # Config errors surface here, before Prefect starts a flow run (or a server).
            point_overrides(Path(args.repo) / "params.yaml", point, args.gamma_key, params)
        # SIGTERM would otherwise leave Prefect's temporary server running (flows/temporary_server.py).
        with stop_temporary_server_on_termination():
            result = sweep_flow(
                repo=args.repo, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                gammas=args.gammas, gamma_key=args.gamma_key, params=params or None, jobs=args.jobs,
                dask_address=args.dask_address, retries=args.retries,
                retry_backoff_s=args.retry_backoff, sweep_name=args.name, output_dir=args.output_dir,
            )
    except (CmkdError, DvcCommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(result["markdown"]).read_text(), end="")
    print(json.dumps({"markdown": result["markdown"], "csv": result["csv"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
