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
* Results: DVC's own tables, `dvc exp show --md` and `--csv` (params and metrics columns, the
  dependency hashes dropped), cut to this sweep's experiments, go to
  `data/sweeps/<sweep>/results.md` and `results.csv`. The flow also returns, and publishes as
  the Prefect table artifact `cmkd-sweep`, one row per grid point with its metrics from
  `dvc exp show --json`, where a column named after the point's own method reads `<method>`
  (`rows.<method>.f1_weighted.mean`, see `metric_columns`), so the points line up in one
  column, which DVC's tables (one column per method) cannot do. `dvc exp apply <name>`
  restores an experiment.
* Stages shared by all points (download, prepare, the teacher) come from DVC's run cache when
  they ran before: run the pipeline once first, or concurrent points compute them twice.
* Only git-tracked files (committed or not) are copied into an experiment: `git add` new
  scripts first (the flow warns about untracked files).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from cmkd.errors import CmkdError, ConfigError
from cmkd.utils.atomic import write_text
from flows.dvc_cli import DvcCommandError, dvc_args, run_captured, terminate_children
from flows.experiments import ExperimentFailedError, experiment_results, head_commit, run_experiment
from flows.lock import workspace_lock
from flows.overrides import (
    check_unique,
    override_key,
    require_git_commit,
    selection_overrides,
    validate_overrides,
)
from flows.reports import flatten
from flows.temporary_server import stop_temporary_server_on_termination

DEFAULT_GAMMA_KEY = "data.synthetic.gamma"
ARTIFACT_KEY = "cmkd-sweep"
POINT_COLUMNS = ("experiment", "dataset", "method", "seed", "gamma", "status")

__all__ = ["ExperimentFailedError", "SweepFailedError", "sweep_flow", "grid_points", "point_name",
           "point_overrides", "metric_columns", "main"]


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
                    overrides: Sequence[str] | None = None) -> list[str]:
    """The `-S` overrides of one grid point, validated against params.yaml (a bad key or
    value fails here, before any experiment starts, not once per point later)."""
    point_sets = selection_overrides([point["dataset"]] if "dataset" in point else None,
                                     [point["method"]] if "method" in point else None,
                                     [point["seed"]] if "seed" in point else None)
    if "gamma" in point:
        point_sets.append(f"{gamma_key}={float(point['gamma'])!r}")
    given = {override_key(o) for o in overrides or []}
    for own in point_sets:
        if override_key(own) in given:
            raise ConfigError(override_key(own), "set twice (by the grid and by --set)")
    result = point_sets + list(overrides or [])
    check_unique(result)
    validate_overrides(params_file, result)
    return result


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


def dvc_tables(repo_root: Path, baseline: str, names: Sequence[str], deps: Sequence[str]) -> tuple[str, str]:
    """DVC's `dvc exp show --md` and `--csv` of commit `baseline`, cut to the experiments
    `names` (DVC's tables list every experiment of the commit), dependency hashes dropped."""
    drop = ["--drop", "^(" + "|".join(map(re.escape, deps)) + ")$"] if deps else []
    tables = []
    for fmt in ("--md", "--csv"):
        args = dvc_args("exp", "show", fmt, "--rev", baseline, "--hide-workspace", "--hide-queued",
                        "--no-pager", *drop)
        result = run_captured(args, repo_root)
        if result.returncode != 0:
            raise DvcCommandError(args, result.returncode, result.output_tail)
        tables.append(result.stdout)
    md_lines = tables[0].strip().splitlines()
    tags = tuple(f"[{name}]" for name in names)
    md = md_lines[:2] + [line for line in md_lines[2:] if line.split("|")[1].strip().endswith(tags)]
    csv_rows = list(csv.reader(io.StringIO(tables[1])))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(csv_rows[:1] + [r for r in csv_rows[1:] if r and r[0] in names])
    return "\n".join(md) + "\n", out.getvalue()


@flow(name="cmkd-sweep")
def sweep_flow(
    repo: str = ".",
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    gammas: list[float] | None = None,
    gamma_key: str = DEFAULT_GAMMA_KEY,
    overrides: list[str] | None = None,
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
        overrides: `dvc exp run -S` overrides applied to every point (`["runs.kdv1.temperature=2"]`).
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
    per_point = [(point, point_name(sweep, point), point_overrides(params_file, point, gamma_key, overrides))
                 for point in points]
    require_git_commit(root)
    baseline = head_commit(root)
    if untracked := _untracked(root):
        logger.warning("untracked files are not copied into the experiments (git add them "
                       "if stages need them): %s", " ".join(untracked[:20]))
    experiment_task = run_experiment.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s)(retries) if retries else 0,
    )
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address)
        logger.info("%d experiments on the Dask cluster at %s", len(per_point), dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=jobs)
        logger.info("%d experiments, %d at a time", len(per_point), jobs)
    # Each `dvc exp run --temp` copies the workspace: no `make repro` may change it meanwhile.
    with workspace_lock(root, log=logger.info):
        with runner:
            futures = [runner.submit(experiment_task, parameters={
                "repo_root": str(root), "name": name, "overrides": point_sets})
                for _, name, point_sets in per_point]
            try:
                wait(futures)
            except BaseException:
                terminate_children()  # SIGTERM or Ctrl-C: end the running experiments now
                raise
        failed = {}
        for (_, name, _), future in zip(per_point, futures):
            if not future.state.is_completed():
                failed[name] = str(future.result(raise_on_failure=False))
        results = experiment_results(root, baseline)
    rows: list[dict] = []
    metric_names: set[str] = set()
    deps: set[str] = set()
    for point, name, _ in per_point:
        row = {"experiment": name, **point, "status": "failed" if name in failed else "done"}
        if name not in failed:
            values = metric_columns(results.get(name, {}).get("metrics", {}), point.get("method"))
            metric_names.update(values)
            row.update(values)
            deps.update(results.get(name, {}).get("deps", {}))
        rows.append(row)
    columns = [c for c in POINT_COLUMNS if any(c in r for r in rows)] + sorted(metric_names)
    out_dir = Path(output_dir) if output_dir else root / "data" / "sweeps" / sweep
    done = [name for _, name, _ in per_point if name not in failed]
    md, csv_text = dvc_tables(root, baseline, done, sorted(deps))
    md_path, csv_path = out_dir / "results.md", out_dir / "results.csv"
    write_text(md_path, md)
    write_text(csv_path, csv_text)
    create_table_artifact([{c: row.get(c) for c in columns} for row in rows], key=ARTIFACT_KEY,
                          description=f"cmkd sweep {sweep}: one row per grid point, experiments of commit "
                          f"{baseline[:10]} (`dvc exp show`)")
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
                        help="override for every point, as `dvc exp run -S`; repeatable")
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
        for point in grid_points(args.datasets, args.methods, args.seeds, args.gammas):
            # Config errors surface here, before Prefect starts a flow run (or a server).
            point_overrides(Path(args.repo) / "params.yaml", point, args.gamma_key, args.sets)
        # SIGTERM would otherwise leave Prefect's temporary server running (flows/temporary_server.py).
        with stop_temporary_server_on_termination():
            result = sweep_flow(
                repo=args.repo, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                gammas=args.gammas, gamma_key=args.gamma_key, overrides=args.sets or None, jobs=args.jobs,
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
