"""The nightly "reproduce and check the paper claims" deployment of `cmkd-pipeline`.

    python -m flows.deploy --show                 # print the deployment; needs no server
    python -m flows.deploy --serve                # register it and run it on schedule, here
    python -m flows.deploy --deploy --work-pool cmkd   # for `prefect worker start --pool cmkd`

Every night (cron `0 3 * * *`, UTC by default) the pipeline flow runs on this repository with
its own params.yaml: DVC reruns whatever changed since the last run (code, data, params), the
`check` stages compare the results with the papers' claims. A claim whose verdict changed does
not fail the run: it heads the run's `cmkd-pipeline` artifact (section "CHANGED", above the
claims table) and is logged as a warning (`python -m stages check --strict` is the failing
form, for regression tests). Pass `--force` to make the nightly run re-execute every stage (a full
reproduction from scratch, not only of what changed).

Both ways need a Prefect server (`prefect server start`, see docs/prefect.md):
* `--serve` keeps this process running; it starts the scheduled runs itself (no work pool).
* `--deploy --work-pool <name>` registers the deployment (source: this checkout) with a
  process work pool and returns; `prefect worker start --pool <name>` (any number, on machines
  that see this path) runs the scheduled runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

NIGHTLY_CRON = "0 3 * * *"
DEPLOYMENT_NAME = "nightly-claims"
ENTRYPOINT = "flows/pipeline.py:pipeline_flow"
REPO_ROOT = Path(__file__).resolve().parent.parent


def nightly_parameters(repo: str | Path = REPO_ROOT, force: bool = False) -> dict:
    return {"repo": str(Path(repo).resolve()), "force": force, "jobs": 1, "retries": 2,
            "retry_backoff_s": 60.0}


def nightly_deployment(
    repo: str | Path = REPO_ROOT,
    cron: str = NIGHTLY_CRON,
    timezone: str = "UTC",
    name: str = DEPLOYMENT_NAME,
    force: bool = False,
    work_pool: str | None = None,
):
    """The RunnerDeployment (not yet registered with any server).

    Without `work_pool` it is served by this process (`prefect.serve`); with it, the flow is
    loaded from this checkout's source so a worker of that pool can run it.
    """
    from prefect.schedules import Cron

    from flows.pipeline import pipeline_flow

    kwargs = dict(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=nightly_parameters(repo, force),
        description="Nightly: reproduce the cmkd pipeline with DVC and check the papers' claims.",
        tags=["cmkd", "nightly"],
    )
    if work_pool is None:
        return pipeline_flow.to_deployment(**kwargs)
    source_flow = pipeline_flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    return source_flow.to_deployment(work_pool_name=work_pool, **kwargs)


def describe(deployment) -> dict:
    return {
        "flow": "cmkd-pipeline",
        "deployment": deployment.name,
        "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone}
                      for s in deployment.schedules or []],
        "parameters": deployment.parameters,
        "work_pool": deployment.work_pool_name,
        "entrypoint": deployment.entrypoint,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description="The nightly 'reproduce and check the paper claims' deployment of the "
        "cmkd-pipeline flow.",
        epilog="--serve and --deploy need a running Prefect server: `prefect server start`, "
        "then `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` (docs/prefect.md).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--show", action="store_true", help="print the deployment and exit")
    mode.add_argument("--serve", action="store_true",
                      help="register the deployment and run its schedule in this process")
    mode.add_argument("--deploy", action="store_true",
                      help="register the deployment with --work-pool's process work pool and exit")
    parser.add_argument("--work-pool", metavar="POOL",
                        help="process work pool whose workers run the deployment (with --deploy)")
    parser.add_argument("--repo", default=str(REPO_ROOT), help="DVC project (default: this checkout)")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"schedule (default '{NIGHTLY_CRON}')")
    parser.add_argument("--timezone", default="UTC", help="the cron's time zone (default UTC)")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME})")
    parser.add_argument("--force", action="store_true",
                        help="nightly runs re-execute every stage instead of only stale ones")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.deploy and not args.work_pool:
        parser.error("--deploy needs --work-pool POOL")
    if args.serve and args.work_pool:
        parser.error("--serve runs the flow in this process; it takes no --work-pool")
    deployment = nightly_deployment(args.repo, args.cron, args.timezone, args.name, args.force,
                                    work_pool=args.work_pool)
    print(json.dumps(describe(deployment), indent=2))
    if args.serve:
        from prefect import serve

        serve(deployment)
    elif args.deploy:
        deployment_id = deployment.apply(work_pool_name=args.work_pool)
        print(f"registered deployment {deployment_id}; run it with: "
              f"prefect worker start --pool {args.work_pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
