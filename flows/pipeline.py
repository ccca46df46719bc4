"""Prefect flow `cmkd-pipeline`: run the DVC pipeline stage by stage.

    python -m flows.pipeline                                   # like `dvc repro`, with Prefect
    python -m flows.pipeline --datasets synthetic --set runs.kdv1.temperature=2
    python -m flows.pipeline --help

How it works
------------
* The stages and their order come from DVC (`flows.stage_graph`: `dvc dag --dot`, after DVC
  resolved `foreach`/`matrix` with the current params). There is no stage list in this file.
* One Prefect task per stage, submitted upstream first; a task waits only for its own upstream
  stages, so independent stages (e.g. the distill runs of one dataset) overlap when `jobs` > 1.
  A stage runs as `dvc --wait-for-lock repro --single-item <stage>` in a child process (its
  own process group), with DVC's console output. DVC releases its repo lock while a stage's
  command runs, so independent stages overlap without corrupting dvc.lock.
* Ran or up to date? DVC's answer, `dvc status --json`: taken once for every stage at the start
  (one DVC process), and again for one stage just before it would run when an upstream stage
  ran in this flow (its outputs may have come out identical) or on a retry. A stage that was
  clean at the start, none of whose upstream stages ran, cannot have become stale (nothing it
  depends on was touched; the workspace lock keeps other runs out), so its task records "up
  to date" without starting DVC. Output text is never parsed.
* Cores: `jobs` is a Prefect global concurrency limit of that many slots, created for the run
  (`cmkd-cores-<flow run id>`) and deleted after it; a stage holds min(threads, jobs) slots
  while its DVC process runs, `threads` being its dvc.yaml `meta: {threads: N}` (default 1),
  so a stage computing on 2 OpenMP threads never shares 2 cores with another stage.
* The stage's output (DVC's and the stage command's, stdout and stderr) is streamed line by
  line into the task's log (flows/dvc_cli.py); a failed stage raises `StageFailedError` with
  its last output lines.
* Retries: `retries` attempts more, with exponential back-off (`retry_backoff_s`, doubled each
  time), for transient failures. A stage that failed on a bad params value or input file
  (cmkd's ConfigError / DataFormatError; the stage writes the file named by CMKD_ERROR_FILE) is
  not retried: it would fail the same way.
* At the end: a Markdown artifact `cmkd-pipeline` with the stage outcomes, every dataset's
  `data/reports/<dataset>/table.md` and the claim results, written also when a stage failed.
  A claim whose verdict differs from its expected one is listed first, under "CHANGED", and
  logged as a warning; it does not fail the run.

Parameter overrides (datasets, methods, seeds, `overrides`)
-----------------------------------------------------------
Any override makes the run a DVC experiment: `dvc exp run --temp -n <name> -S KEY=VALUE ...`
(flows/experiments.py), one Prefect task, in a private copy of the workspace, which is never
edited. The flow then reports which stages' results differ from the workspace's (the
experiment's dvc.lock against the workspace's) and builds the artifact from the experiment's
files; `dvc exp show` lists it, `dvc exp apply <name>` brings it into the workspace.

One cmkd flow or `make repro` runs in a workspace at a time (flows/lock.py); a second one waits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from cmkd.errors import CmkdError, ConfigError
from flows.dvc_cli import DvcCommandError, dvc_args, run_streaming, stopping, terminate_children
from flows.experiments import experiment_results, head_commit, read_at, run_experiment, stage_outcomes
from flows.lock import workspace_lock
from flows.overrides import require_git_commit, selection_overrides, validate_overrides
from flows.reports import changed_claims, pipeline_markdown
from flows.stage_graph import PlannedStage, read_stage_plan, stale_stages
from flows.temporary_server import stop_temporary_server_on_termination

RAN = "ran"
UP_TO_DATE = "up to date"
FAILED = "failed"
NOT_RUN = "not run"  # an upstream stage failed

ARTIFACT_KEY = "cmkd-pipeline"
# The exit code run_stage reports when the stage failed on a bad params value or input file.
NOT_RETRYABLE = 3


class StageFailedError(CmkdError):
    """`dvc repro` of one stage failed; the message ends with that stage's last output lines."""

    def __init__(self, stage: str, returncode: int, output_tail: str):
        self.stage = stage
        self.returncode = returncode
        self.output_tail = output_tail
        super().__init__(f"stage {stage!r} failed (dvc repro exit code {returncode}):\n{output_tail}")


class PipelineFailedError(CmkdError):
    """One or more stages failed; the message has each failed stage's error text."""

    def __init__(self, failed: dict[str, str], not_run: Sequence[str]):
        self.failed = failed
        self.not_run = list(not_run)
        lines = [f"{len(failed)} stage(s) failed: {', '.join(failed)}"]
        for name, error in failed.items():
            lines.append(f"--- {name} ---\n{error}")
        if not_run:
            lines.append("not run because an upstream stage failed: " + ", ".join(not_run))
        super().__init__("\n".join(lines))


@task(name="dvc-stage", task_run_name="{stage_name}", cache_policy=NO_CACHE)
def run_stage(
    repo_root: str,
    stage_name: str,
    start_status: list,
    upstream: list[dict],
    force: bool = False,
    cores_limit: str | None = None,
    cores: int = 1,
) -> dict:
    """Reproduce one DVC stage if DVC finds it stale; see the module docstring. While its DVC
    process runs it holds `cores` slots of the Prefect concurrency limit `cores_limit`."""
    logger = get_run_logger()
    attempt = max(1, task_run.run_count)
    upstream_ran = [u["stage"] for u in upstream if u["status"] == RAN]
    outcome = {"stage": stage_name, "attempts": attempt, "reasons": start_status, "seconds": 0.0}
    if not force and attempt == 1 and not upstream_ran and not start_status:
        # Clean at the start and nothing it depends on has run since: DVC would skip it.
        logger.info("%s: up to date (dvc status clean, no upstream stage ran)", stage_name)
        return {**outcome, "status": UP_TO_DATE}
    if not force and (upstream_ran or attempt > 1):
        reasons = stale_stages(repo_root, [stage_name]).get(stage_name, [])
        if not reasons:
            logger.info("%s: up to date (dvc status after %s)", stage_name,
                        f"attempt {attempt - 1}" if attempt > 1 else f"upstream {', '.join(upstream_ran)} ran")
            return {**outcome, "status": UP_TO_DATE}
        outcome["reasons"] = reasons
    logger.info("%s: %s", stage_name, "--force" if force else f"dvc status: {json.dumps(outcome['reasons'])}")
    args = dvc_args("repro", "--single-item", *(["--force"] if force else []), stage_name)
    logger.info("$ dvc repro --single-item %s%s", "--force " if force else "", stage_name)
    slots = concurrency(cores_limit, occupy=cores, strict=True) if cores_limit else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="cmkd-stage-") as tmp, slots:
        # stages/_common.py writes this file when the stage failed on a bad params value or input
        marker = Path(tmp) / "config-error"
        result = run_streaming(args, repo_root, lambda line: logger.info("%s", line),
                               extra_env={"CMKD_ERROR_FILE": str(marker)})
        if result.returncode != 0:
            code = NOT_RETRYABLE if marker.exists() else result.returncode
            raise StageFailedError(stage_name, code, result.output_tail)
    logger.info("%s: done in %.1f s", stage_name, result.seconds)
    return {**outcome, "status": RAN, "seconds": round(result.seconds, 3)}


def _retryable(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: a configuration or input error fails the same way again,
    and nothing is retried while the flow is being stopped."""
    if stopping():
        return False
    try:
        state.result()
    except StageFailedError as exc:
        return exc.returncode != NOT_RETRYABLE
    except CmkdError:
        return False
    except Exception:
        return True
    return True


@contextlib.contextmanager
def cores_limit(jobs: int) -> Iterator[str]:
    """A Prefect global concurrency limit of `jobs` slots for this flow run's stages.

    Created here because Prefect's `concurrency()` only uses limits that exist (a temporary
    server starts empty); named after the flow run, so runs never share or resize each other's
    limit, and deleted when the run ends."""
    name = f"cmkd-cores-{flow_run.get_id() or 'local'}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=jobs))
    try:
        yield name
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)


def _run_stages(
    root: Path, plan: list[PlannedStage], start: dict[str, list], *, force: bool, jobs: int,
    retries: int, retry_backoff_s: float,
) -> tuple[list[dict], dict[str, str]]:
    """Submit one task per stage, upstream first; return outcomes and failed stage errors."""
    stage_task = run_stage.with_options(
        retries=retries,
        retry_condition_fn=_retryable,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s)(retries) if retries else 0,
    )
    futures = {}
    # A pool local to this run, so `jobs` is an ordinary flow parameter (settable per run,
    # per deployment, in the UI) rather than fixed in the @flow decorator.
    with cores_limit(jobs) as limit, ThreadPoolTaskRunner(max_workers=jobs) as runner:
        for stage in plan:
            futures[stage.name] = runner.submit(
                stage_task,
                parameters={
                    "repo_root": str(root),
                    "stage_name": stage.name,
                    "start_status": start.get(stage.name, []),
                    "upstream": [futures[name] for name in stage.upstream],
                    "force": force,
                    "cores_limit": limit,
                    "cores": min(stage.threads, jobs),
                },
            )
        try:
            wait(list(futures.values()))
        except BaseException:
            # SIGTERM (Prefect's TerminationSignal) or Ctrl-C: end the running stages now;
            # the pool's threads then return at once instead of after their stages finish.
            terminate_children()
            raise
    outcomes, failed = [], {}
    for name, future in futures.items():
        state = future.state
        if state.is_completed():
            outcomes.append(future.result())
        elif state.is_failed():
            error = future.result(raise_on_failure=False)
            failed[name] = str(error)
            outcomes.append({"stage": name, "status": FAILED, "error": str(error)})
        else:  # NotReady: an upstream stage failed
            outcomes.append({"stage": name, "status": NOT_RUN})
    return outcomes, failed


def _experiment_name(requested: str | None) -> str:
    if requested:
        return requested
    run_id = flow_run.get_id() or ""
    return f"pipeline-{flow_run.get_name() or 'run'}-{str(run_id).replace('-', '')[:6]}"


def _run_experiment(root: Path, overrides: list[str], name: str, retries: int,
                    retry_backoff_s: float) -> tuple[list[dict], dict[str, str], str | None]:
    """The run with overrides: one DVC experiment; outcomes per stage from its dvc.lock."""
    experiment_task = run_experiment.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s)(retries) if retries else 0,
    )
    baseline = head_commit(root)
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        future = runner.submit(experiment_task, parameters={"repo_root": str(root), "name": name,
                                                            "overrides": overrides})
        try:
            wait([future])
        except BaseException:
            terminate_children()  # SIGTERM or Ctrl-C: end DVC and its stages now
            raise
    state = future.state
    if not state.is_completed():
        return [{"stage": name, "status": FAILED}], {name: str(state.result(raise_on_failure=False))}, None
    rev = experiment_results(root, baseline)[name]["rev"]
    outcome = stage_outcomes(root, rev)
    rows = [{"stage": s, "status": RAN} for s in outcome["ran"]]
    rows += [{"stage": s, "status": UP_TO_DATE} for s in outcome["up_to_date"]]
    return rows, {}, rev


@flow(name="cmkd-pipeline")
def pipeline_flow(
    repo: str = ".",
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    jobs: int = 1,
    retries: int = 2,
    retry_backoff_s: float = 10.0,
    experiment_name: str | None = None,
) -> dict:
    """Run every DVC stage of `repo` as a Prefect task; return which ran and which were up to date.

    Args:
        repo: the DVC project (a checkout of this repository).
        datasets, methods, seeds: replace params.yaml's lists for this run.
        overrides: other params.yaml overrides, `dvc exp run -S` syntax (`["runs.kdv1.temperature=2"]`).
            Any override makes the run a DVC experiment and leaves the workspace untouched.
        force: rerun every stage (`dvc repro --force`), even up-to-date ones (not with overrides).
        jobs: core slots for stages running side by side (a stage holds its `meta.threads`).
        retries, retry_backoff_s: extra attempts per failed stage; first delay, doubled each time.
        experiment_name: name of the DVC experiment (runs with overrides; default from the run).
    """
    logger = get_run_logger()
    if jobs < 1:
        raise ConfigError("jobs", "must be at least 1")
    if retries < 0:
        raise ConfigError("retries", "must be >= 0")
    root = Path(repo).resolve()
    all_overrides = selection_overrides(datasets, methods, seeds) + list(overrides or [])
    # Every value checked up front, also without overrides (one line naming the key).
    validate_overrides(root / "params.yaml", all_overrides)
    if all_overrides:
        require_git_commit(root)
        if force:
            raise ConfigError("force", "a run with overrides is a DVC experiment; DVC decides what reruns")
    experiment = rev = None
    with workspace_lock(root, log=logger.info):
        if all_overrides:
            experiment = _experiment_name(experiment_name)
            logger.info("overrides: %s; running DVC experiment %r", " ".join(all_overrides), experiment)
            outcomes, failed, rev = _run_experiment(root, all_overrides, experiment, retries, retry_backoff_s)
        else:
            plan = read_stage_plan(root)
            start = stale_stages(root)
            logger.info("DVC plan (%d stages): %s", len(plan), ", ".join(s.name for s in plan))
            outcomes, failed = _run_stages(root, plan, start, force=force, jobs=jobs,
                                           retries=retries, retry_backoff_s=retry_backoff_s)
        rows = [{"stage": o["stage"], "status": o["status"], "seconds": o.get("seconds"),
                 "attempts": o.get("attempts")} for o in outcomes]
        read = read_at(root, rev)
        create_markdown_artifact(
            pipeline_markdown(root, rows, experiment=experiment if rev else None, failed=bool(failed), read=read),
            key=ARTIFACT_KEY,
            description="cmkd pipeline: stage outcomes, result tables, paper-claim checks",
        )
        for c in changed_claims(root, read=read):  # also at the top of the artifact; never a failed run
            logger.warning("claim %s changed: verdict %s, recorded %s%s (%s)", c["claim"], c["verdict"],
                           c["recorded"], "" if c["enforced"] else ", not enforced", c["report"])
    not_run = [o["stage"] for o in outcomes if o["status"] == NOT_RUN]
    if failed:
        raise PipelineFailedError(failed, not_run)
    result = {
        "repo": str(root),
        "ran": [o["stage"] for o in outcomes if o["status"] == RAN],
        "up_to_date": [o["stage"] for o in outcomes if o["status"] == UP_TO_DATE],
        "overrides": all_overrides,
        "experiment": experiment,
        "stages": outcomes,
    }
    logger.info("ran: %s; up to date: %s", result["ran"] or "none", result["up_to_date"] or "none")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the cmkd DVC pipeline as a Prefect flow: one task per DVC stage, in "
        "DVC's order; DVC decides what is stale. With any override (--datasets, --methods, "
        "--seeds, --set) the run is a DVC experiment (`dvc exp run --temp`) and your workspace "
        "is left as it was.",
        epilog="Without PREFECT_API_URL, Prefect starts a temporary local server for the run "
        "(10-20 s); see docs/prefect.md to run against `prefect server start` and its UI.",
    )
    parser.add_argument("--repo", default=".", help="DVC project root (default: .)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="datasets to run")
    parser.add_argument("--methods", nargs="+", metavar="RUN", help="distillation runs (params `methods`)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds to run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override, as `dvc exp run -S`; repeatable "
                        "(e.g. --set runs.kdv1.temperature=2)")
    parser.add_argument("--force", action="store_true", help="rerun every stage (not with overrides)")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="core slots for independent stages side by side (default 1)")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts per failed stage (default 2)")
    parser.add_argument("--retry-backoff", type=float, default=10.0, metavar="SECONDS",
                        help="first retry delay, doubled per retry (default 10)")
    parser.add_argument("--name", help="DVC experiment name for runs with overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Config errors surface here, before Prefect starts a flow run (or a server).
        overrides = selection_overrides(args.datasets, args.methods, args.seeds) + args.sets
        validate_overrides(Path(args.repo) / "params.yaml", overrides)
        # SIGTERM would otherwise leave Prefect's temporary server running (flows/temporary_server.py).
        with stop_temporary_server_on_termination():
            result = pipeline_flow(
                repo=args.repo, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                overrides=args.sets or None, force=args.force, jobs=args.jobs, retries=args.retries,
                retry_backoff_s=args.retry_backoff, experiment_name=args.name,
            )
    except (CmkdError, DvcCommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {k: result[k] for k in ("ran", "up_to_date", "experiment")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
