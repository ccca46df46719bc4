"""The pipeline's stages and their dependencies, read from dvc.yaml through DVC itself.

Nothing here lists stages by hand: DVC resolves dvc.yaml (templating, `foreach`, `matrix`,
params.yaml values such as `datasets` or `methods`) and builds its stage graph; we take the
order `dvc repro` itself would use (DVC's `plan_repro`, a depth-first post-order of the
graph with frozen stages cut from their dependencies) and each stage's direct upstream
stages, so the flow can start a stage as soon as its own dependencies are done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cmkd.errors import CmkdError


@dataclass(frozen=True)
class PlannedStage:
    """One stage `dvc repro` would visit.

    name: DVC's address of the stage (`train`, `distill@synthetic-kdv1`, or
        `sub/dvc.yaml:train` for a nested dvc.yaml): what `dvc repro` and `dvc status` accept.
    upstream: names of the planned stages whose outputs this stage depends on directly.
    uncached_outs: outputs declared `cache: false` (paths relative to the repo root): DVC
        cannot restore these from its cache, so a run that must leave the workspace as it
        found it backs them up itself.
    threads: the intra-op threads the stage's command computes on, from its dvc.yaml
        `meta: {threads: N}` (DVC ignores `meta`; default 1): a flow running stages side by
        side gives it that many of its slots (flows/core_slots.py).
    """

    name: str
    upstream: tuple[str, ...]
    frozen: bool = False
    uncached_outs: tuple[str, ...] = ()
    threads: int = 1


def _address(stage) -> str:
    """DVC's `addressing` of a stage, relative to the repo root rather than the current
    directory (what `dvc repro` and `dvc status` accept when run in the root)."""
    from dvc.dvcfile import PROJECT_FILE
    from dvc.stage import PipelineStage

    rel = stage.path_in_repo.replace(os.sep, "/")
    if isinstance(stage, PipelineStage):
        return stage.name if rel == PROJECT_FILE else f"{rel}:{stage.name}"
    return rel


def _open_repo(repo_root: str | Path):
    from dvc.repo import Repo

    try:  # as `dvc --wait-for-lock`: queue behind a running DVC command instead of failing
        return Repo(str(repo_root), _wait_for_lock=True)
    except TypeError:  # a DVC without that option
        return Repo(str(repo_root))


def stage_threads(stage) -> int:
    """`meta: {threads: N}` of a DVC stage (a positive integer), else 1."""
    meta = getattr(stage, "meta", None)
    value = meta.get("threads", 1) if isinstance(meta, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CmkdError(f"{stage.path_in_repo}: stage {_address(stage)}: meta.threads must be a positive integer, got {value!r}")
    return value


def read_stage_plan(repo_root: str | Path, *, with_status: bool = False):
    """Stages of `repo_root`'s root dvc.yaml and their upstream stages, in DVC's order.

    Data sources (`dvc add`-ed `.dvc` files) are not stages to run: DVC's status of the
    stages that depend on them already says when they change.

    With `with_status`, returns (plan, status): status maps each stale stage to DVC's
    reasons, exactly the entries of `dvc status --json` (computed by the same Stage.status
    call, in this process, under DVC's repo lock), so no second DVC process is needed.
    """
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with _open_repo(repo_root) as repo:
        # Exactly what `dvc repro` (no targets) plans: the root dvc.yaml's stages and
        # everything they depend on.
        targets = collect_stages(repo, [os.path.join(repo.root_dir, PROJECT_FILE)])
        graph = get_active_graph(repo.index.graph)
        order = plan_repro(graph, targets)
        runnable = [stage for stage in order if not stage.is_data_source]
        names = {stage: _address(stage) for stage in runnable}
        plan = []
        for stage in runnable:
            # DVC's edges point from a stage to the stages it depends on.
            upstream = tuple(
                sorted(names[dep] for dep in graph.successors(stage) if dep in names)
            )
            uncached = tuple(
                os.path.relpath(out.fs_path, repo.root_dir) for out in stage.outs if not out.use_cache
            )
            plan.append(PlannedStage(names[stage], upstream, bool(stage.frozen), uncached, stage_threads(stage)))
        if not with_status:
            return plan
        status = {}
        with repo.lock:
            for stage in runnable:
                # {stage.addressing: reasons} or {}; addressing is relative to the cwd.
                reasons = next(iter(stage.status().values()), [])
                if reasons:
                    status[names[stage]] = reasons
    return plan, status
