"""The pipeline's stages, their dependencies and which are stale, from DVC's command line.

Nothing here lists stages by hand or imports DVC: `dvc dag --dot` gives the stages as DVC
resolves dvc.yaml (templating, `foreach`, `matrix`, the params.yaml values they expand over)
and the edges between them; `dvc status --json` says which stages are stale and why. The only
thing read from dvc.yaml itself is each stage's `meta: {threads: N}`, a field DVC keeps for
its users and ignores.
"""

from __future__ import annotations

import graphlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cmkd.errors import CmkdError
from flows.dvc_cli import DvcCommandError, dvc_args, run_captured, run_json

PROJECT_FILE = "dvc.yaml"
_NODE = re.compile(r'^"(?P<name>[^"]+)";$')
_EDGE = re.compile(r'^"(?P<source>[^"]+)" -> "(?P<target>[^"]+)";$')


@dataclass(frozen=True)
class PlannedStage:
    """One stage `dvc repro` would visit.

    name: DVC's address of the stage (`train`, `distill@synthetic-kdv1`, or
        `sub/dvc.yaml:train` for a nested dvc.yaml): what `dvc repro` and `dvc status` accept.
    upstream: names of the planned stages whose outputs this stage depends on directly.
    threads: the intra-op threads the stage's command computes on, from its dvc.yaml
        `meta: {threads: N}` (DVC ignores `meta`; default 1): a flow running stages side by
        side makes it hold that many of its core slots.
    """

    name: str
    upstream: tuple[str, ...]
    threads: int = 1


def parse_dag_dot(text: str) -> dict[str, set[str]]:
    """`dvc dag --dot` output -> {stage: its direct upstream stages}. DVC's edges point from
    a stage to the stages that consume its outputs. `.dvc` files (data sources, not stages to
    run) are left out; DVC's status of the stages reading them already says when they change."""
    upstream: dict[str, set[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if node := _NODE.match(line):
            upstream.setdefault(node["name"], set())
        elif edge := _EDGE.match(line):
            upstream.setdefault(edge["target"], set()).add(edge["source"])
            upstream.setdefault(edge["source"], set())
    return {name: {u for u in ups if not u.endswith(".dvc")}
            for name, ups in upstream.items() if not name.endswith(".dvc")}


def stage_threads(root: Path, name: str, cache: dict[str, dict]) -> int:
    """`meta: {threads: N}` of the stage `name` in its dvc.yaml (a positive integer), else 1.

    A `foreach` stage `train@x` keeps its meta under `do`; a `matrix` stage at its top level."""
    file, _, stage = name.rpartition(":") if ":" in name else (PROJECT_FILE, "", name)
    if file not in cache:
        cache[file] = (yaml.safe_load((root / file).read_text()) or {}).get("stages") or {}
    definition = cache[file].get(stage.partition("@")[0]) or {}
    meta = (definition.get("do") or definition).get("meta")
    value = meta.get("threads", 1) if isinstance(meta, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CmkdError(f"{file}: stage {stage}: meta.threads must be a positive integer, got {value!r}")
    return value


def read_stage_plan(repo_root: str | Path) -> list[PlannedStage]:
    """The stages of `repo_root`'s pipeline with their upstream stages, upstream first
    (a topological order of DVC's graph; the flow starts a stage once its own upstream is done)."""
    root = Path(repo_root)
    result = run_captured(dvc_args("dag", "--dot"), root)
    if result.returncode != 0:
        raise DvcCommandError(dvc_args("dag", "--dot"), result.returncode, result.output_tail)
    graph = parse_dag_dot(result.stdout)
    cache: dict[str, dict] = {}
    order = graphlib.TopologicalSorter(graph).static_order()
    return [PlannedStage(name, tuple(sorted(graph[name])), stage_threads(root, name, cache)) for name in order]


def stale_stages(repo_root: str | Path, targets: list[str] | None = None) -> dict[str, list]:
    """`dvc status --json [targets]`: each stale stage and DVC's reasons; an up-to-date one is absent."""
    status = run_json(dvc_args("status", "--json", *(targets or [])), repo_root)
    return {name: reasons for name, reasons in status.items() if reasons}
