"""Prefect flow `cmkd-pipeline`: run the DVC pipeline stage by stage.

    python -m flows.pipeline                                   # like `dvc repro`, with Prefect
    python -m flows.pipeline --datasets synthetic --set runs.kdv1.temperature=2
    python -m flows.pipeline --help

How it works
------------
* The stages and their order come from DVC (`flows.stage_graph.read_stage_plan`: DVC resolves
  dvc.yaml, including `foreach`/`matrix` and the params it interpolates, builds its graph, and
  its own `plan_repro` orders it). There is no stage list in this file.
* One Prefect task per stage, submitted in DVC's order; a task waits only for its own upstream
  stages, so independent stages (e.g. the distill runs of one dataset) overlap when `jobs` > 1.
  A stage that may be stale runs in a child process, `flows/dvc_stage.py`, which calls DVC's
  `Repo.reproduce(<stage>, single_item=True)`, the function behind `dvc repro --single-item
  <stage>`, with DVC's own console output. It waits for DVC's repo lock (as
  `dvc --wait-for-lock`); DVC releases that lock while a stage's command runs, so independent
  stages overlap without corrupting dvc.lock.
* Ran or up to date? DVC's own answer: `Repo.reproduce` returns the stages it reproduced (ran,
  or restored from its run cache) and nothing for a stage it found unchanged; the child writes
  that list to a file. Output text such as "didn't change, skipping" is never parsed (its
  wording is not an interface), and no earlier status is trusted for a stage DVC is asked to
  reproduce, so nothing can change between DVC's check and its run. One shortcut keeps an
  up-to-date pipeline within seconds of a bare `dvc repro` (benchmarks/prefect_overhead.py):
  the flow takes DVC's status of every stage once, at the start (the same `Stage.status` call
  `dvc status` makes, in this process, while it reads the graph). A stage that was clean then,
  and none of whose upstream stages ran in this flow, cannot have become stale (nothing it
  depends on was touched), so its task records "up to date" without starting a DVC process.
  Retried attempts and `force` always go to DVC.
* The stage's output (DVC's and the stage command's, stdout and stderr) is streamed line by
  line into the task's log; progress-bar redraws are rate limited. A failed stage raises
  `StageFailedError` carrying the last lines of that output, so the error is visible in the
  exception, the task's state and the UI.
* Retries: `retries` attempts more, with exponential back-off (`retry_backoff_s`, doubled each
  time), for transient failures (a lost file system, an out-of-memory kill, a busy GPU). A stage
  that failed on a bad params value or input file (cmkd's ConfigError / DataFormatError) is
  not retried: `flows/dvc_stage.py` exits 3 and `_retryable` declines.
* At the end: a Markdown artifact `cmkd-pipeline` with the stage outcomes, every dataset's
  `data/reports/<dataset>/table.md` and the claim results (`data/reports/claims.md` or
  `claims.json`), written also when a stage failed (the claims are most wanted then); the
  flow's return value lists the stages that ran and those that were up to date. A claim whose
  verdict differs from its expected one (any claims.json under data/reports/) is listed first,
  under "CHANGED", and logged as a warning; it does not fail the run (the check stages succeed).

Parameter overrides (datasets, methods, seeds, `params`) without mutating your params.yaml
------------------------------------------------------------------------------------------
`dvc exp run -S` in the workspace would leave params.yaml edited, and `dvc exp run --temp` runs
the whole pipeline in one DVC process (no per-stage tasks, retries or logs). So a run with
overrides is a DVC experiment made stage by stage, with the workspace restored afterwards:
1. params.yaml, dvc.lock and every `cache: false` output are backed up (into
   `.dvc/tmp/cmkd-flows/`), then DVC's own `--set-param` code (`dvc.utils.hydra`) writes the
   overrides into params.yaml, so values mean exactly what they mean to `dvc exp run -S`.
   Keys must exist in params.yaml (a typo raises ConfigError naming it; `+key` adds one).
2. The stage graph is read after the edit (a `datasets` override changes the matrix stages),
   and the stages run as above.
3. If every stage succeeded, `dvc exp save -n <name>` records the run as an experiment:
   `dvc exp show` lists it with its params and metrics, `dvc exp apply <name>` brings it into
   the workspace.
4. Always, success or not: params.yaml, dvc.lock and the uncached outputs are put back byte
   for byte and `dvc checkout` restores the cached outputs from DVC's cache. The workspace ends
   as it started; the experiment keeps the results.
A workspace lock (`.dvc/tmp/cmkd-flows/workspace.lock`) admits one cmkd flow per workspace at a
time, so nothing else sees the temporary params. If the process is killed mid-run, the backup
stays and the next flow run stops with instructions to restore it (never guessing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from cmkd.errors import CmkdError, ConfigError
from flows.dvc_cli import DvcCommandError, dvc_args, run_checked, run_streaming, stopping, terminate_children
from flows.overrides import (
    OverrideSession,
    build_overrides,
    check_not_interrupted,
    parse_assignment,
    require_git_commit,
    validate_overrides,
    workspace_lock,
)
from flows.core_slots import CoreSlots
from flows.reports import changed_claims, pipeline_markdown
from flows.stage_graph import PlannedStage, read_stage_plan
from flows.temporary_server import stop_temporary_server_on_termination

RAN = "ran"
UP_TO_DATE = "up to date"
FAILED = "failed"
NOT_RUN = "not run"  # an upstream stage failed

ARTIFACT_KEY = "cmkd-pipeline"
# DVC's note when it restores a stage from its run cache instead of running the command;
# informational only (the ran / up-to-date decision never depends on output text).
_RUN_CACHE_NOTE = "skipping run, checking out outputs"


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


def _describe(reasons: list) -> str:
    return json.dumps(reasons, sort_keys=True)


STAGE_RUNNER = Path(__file__).with_name("dvc_stage.py")

# The running flow's core slots (set by _run_stages for its duration; tasks run in its threads).
_CORE_SLOTS: CoreSlots | None = None


@task(name="dvc-stage", task_run_name="{stage_name}", cache_policy=NO_CACHE)
def run_stage(
    repo_root: str,
    stage_name: str,
    start_status: list,
    upstream: list[dict],
    force: bool = False,
    threads: int = 1,
) -> dict:
    """Reproduce one DVC stage if DVC finds it stale; see the module docstring. While its DVC
    process runs it holds `threads` of the flow's core slots (flows/core_slots.py)."""
    logger = get_run_logger()
    attempt = max(1, task_run.run_count)
    upstream_ran = [u["stage"] for u in upstream if u["status"] == RAN]
    outcome = {"stage": stage_name, "attempts": attempt, "reasons": start_status,
               "seconds": 0.0, "from_run_cache": False}
    if not force and attempt == 1 and not upstream_ran and not start_status:
        # Clean at the start and nothing it depends on has run since: DVC would skip it.
        logger.info("%s: up to date (dvc status clean, no upstream stage ran)", stage_name)
        return {**outcome, "status": UP_TO_DATE}
    if force:
        why = "--force"
    elif attempt > 1:
        why = f"attempt {attempt}"
    elif upstream_ran:
        why = f"upstream {', '.join(upstream_ran)} ran; DVC decides"
    else:
        why = f"dvc status: {_describe(start_status)}"
    logger.info("%s: %s", stage_name, why)
    logger.info("$ dvc repro --single-item %s%s", "--force " if force else "", stage_name)
    seen_run_cache = []

    def log_line(line: str) -> None:
        if _RUN_CACHE_NOTE in line:
            seen_run_cache.append(line)
        logger.info("%s", line)

    slots = _CORE_SLOTS
    with tempfile.TemporaryDirectory(prefix="cmkd-stage-") as tmp, \
            (slots.hold(threads) if slots is not None else contextlib.nullcontext()):
        result_file = Path(tmp) / "result.json"
        args = [sys.executable, str(STAGE_RUNNER), stage_name, str(result_file)]
        result = run_streaming(args + (["--force"] if force else []), repo_root, log_line)
        if result.returncode != 0:
            raise StageFailedError(stage_name, result.returncode, result.output_tail)
        reproduced = json.loads(result_file.read_text())["reproduced"]
    if not reproduced:
        logger.info("%s: up to date (DVC found nothing changed)", stage_name)
        return {**outcome, "status": UP_TO_DATE, "seconds": round(result.seconds, 3)}
    logger.info("%s: done in %.1f s", stage_name, result.seconds)
    return {**outcome, "status": RAN, "seconds": round(result.seconds, 3),
            "from_run_cache": bool(seen_run_cache)}


# flows/dvc_stage.py's exit code when the stage failed on a bad params value or input file.
NOT_RETRYABLE = 3


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


def _run_stages(
    root: Path, plan: list[PlannedStage], start: dict[str, list], *, force: bool, jobs: int,
    retries: int, retry_backoff_s: float,
) -> tuple[list[dict], dict[str, str]]:
    """Submit one task per stage in DVC's order; return outcomes and failed stage errors."""
    stage_task = run_stage.with_options(
        retries=retries,
        retry_condition_fn=_retryable,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s)(retries)
        if retries else 0,
    )
    global _CORE_SLOTS
    futures = {}
    _CORE_SLOTS = CoreSlots(jobs)
    try:
        # A pool local to this run, so `jobs` is an ordinary flow parameter (settable per run,
        # per deployment, in the UI) rather than fixed in the @flow decorator.
        with ThreadPoolTaskRunner(max_workers=jobs) as runner:
            for stage in plan:
                futures[stage.name] = runner.submit(
                    stage_task,
                    parameters={
                        "repo_root": str(root),
                        "stage_name": stage.name,
                        "start_status": start.get(stage.name, []),
                        "upstream": [futures[name] for name in stage.upstream],
                        "force": force,
                        "threads": stage.threads,
                    },
                )
            try:
                wait(list(futures.values()))
            except BaseException:
                # SIGTERM (Prefect's TerminationSignal) or Ctrl-C: end the running stages now;
                # the pool's threads then return at once instead of after their stages finish.
                terminate_children()
                raise
    finally:
        _CORE_SLOTS = None
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


@flow(name="cmkd-pipeline")
def pipeline_flow(
    repo: str = ".",
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    params: dict[str, Any] | None = None,
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
        params: other params.yaml overrides, dotted key -> value (`{"runs.kdv1.temperature": 2}`).
            Any override makes the run a DVC experiment and leaves the workspace untouched.
        force: rerun every stage (`dvc repro --force`), even up-to-date ones.
        jobs: stages run at the same time at most (independent stages only).
        retries, retry_backoff_s: extra attempts per failed stage; first delay, doubled each time.
        experiment_name: name of the DVC experiment (runs with overrides; default from the run).
    """
    logger = get_run_logger()
    if jobs < 1:
        raise ConfigError("jobs", "must be at least 1")
    if retries < 0:
        raise ConfigError("retries", "must be >= 0")
    root = Path(repo).resolve()
    overrides = build_overrides(root / "params.yaml", datasets=datasets, methods=methods,
                                seeds=seeds, params=params)
    # Every value checked up front, also without overrides (one line naming the key).
    validate_overrides(root / "params.yaml", overrides)
    if overrides:
        require_git_commit(root)
    with workspace_lock(root):
        check_not_interrupted(root)
        session = OverrideSession(root, overrides, logger.info) if overrides else None
        baseline_uncached = (
            [p for s in read_stage_plan(root) for p in s.uncached_outs] if session else []
        )
        with session or contextlib.nullcontext():
            plan, start = read_stage_plan(root, with_status=True)
            if session:
                session.protect(baseline_uncached + [p for s in plan for p in s.uncached_outs])
            logger.info("DVC plan (%d stages): %s", len(plan), ", ".join(s.name for s in plan))
            outcomes, failed = _run_stages(root, plan, start, force=force, jobs=jobs,
                                           retries=retries, retry_backoff_s=retry_backoff_s)
            experiment = None
            if session and not failed:
                experiment = _experiment_name(experiment_name)
                # `cache: false` outputs (metrics.json in data/, git-ignored) are neither in
                # git nor in DVC's cache: add them to the experiment's commit explicitly, as
                # `dvc exp run` does for the outputs it tracks.
                include = sorted({p for s in plan for p in s.uncached_outs if (root / p).exists()})
                save_args = ["exp", "save", "-n", experiment]
                for path in include:
                    save_args += ["-I", path]
                run_checked(dvc_args(*save_args), root, logger.info)
                logger.info("saved the run as DVC experiment %r (dvc exp show)", experiment)
            rows = [{"stage": o["stage"], "status": o["status"], "seconds": o.get("seconds"),
                     "attempts": o.get("attempts")} for o in outcomes]
            create_markdown_artifact(
                pipeline_markdown(root, rows, experiment=experiment, failed=bool(failed)),
                key=ARTIFACT_KEY,
                description="cmkd pipeline: stage outcomes, result tables, paper-claim checks",
            )
            for c in changed_claims(root):  # also at the top of the artifact; never a failed run
                logger.warning("claim %s changed: verdict %s, expected %s%s (%s)", c["claim"], c["verdict"],
                               c["expected"], "" if c["enforced"] else ", not enforced", c["report"])
    not_run = [o["stage"] for o in outcomes if o["status"] == NOT_RUN]
    if failed:
        raise PipelineFailedError(failed, not_run)
    result = {
        "repo": str(root),
        "ran": [o["stage"] for o in outcomes if o["status"] == RAN],
        "up_to_date": [o["stage"] for o in outcomes if o["status"] == UP_TO_DATE],
        "overrides": overrides,
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
        "--seeds, --set) the run is saved as a DVC experiment and your params.yaml, dvc.lock "
        "and outputs are left as they were.",
        epilog="Without PREFECT_API_URL, Prefect starts a temporary local server for the run "
        "(10-20 s); see docs/prefect.md to run against `prefect server start` and its UI.",
    )
    parser.add_argument("--repo", default=".", help="DVC project root (default: .)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="datasets to run")
    parser.add_argument("--methods", nargs="+", metavar="RUN", help="distillation runs (params `methods`)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds to run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override, value read as YAML; repeatable "
                        "(e.g. --set runs.kdv1.temperature=2)")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="independent stages run at once (default 1)")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts per failed stage (default 2)")
    parser.add_argument("--retry-backoff", type=float, default=10.0, metavar="SECONDS",
                        help="first retry delay, doubled per retry (default 10)")
    parser.add_argument("--name", help="DVC experiment name for runs with overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = dict(parse_assignment(text) for text in args.sets)
        # Config errors surface here, before Prefect starts a flow run (or a server).
        overrides = build_overrides(Path(args.repo) / "params.yaml", datasets=args.datasets,
                                    methods=args.methods, seeds=args.seeds, params=params)
        validate_overrides(Path(args.repo) / "params.yaml", overrides)
        # SIGTERM would otherwise leave Prefect's temporary server running (flows/temporary_server.py).
        with stop_temporary_server_on_termination():
            result = pipeline_flow(
                repo=args.repo, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                params=params or None, force=args.force, jobs=args.jobs, retries=args.retries,
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
