"""DVC experiments as Prefect tasks: the one way the flows run a pipeline with other params.

A run with overrides, of the pipeline flow or of one sweep point, is `dvc exp run --temp -n
<name> -S KEY=VALUE ...`: DVC copies the workspace into a private folder, applies the
overrides, reproduces the pipeline there (sharing the cache and the run cache) and records the
result as an experiment of the current commit. The workspace is never edited, so runs can go
side by side. Results come back from DVC: `dvc exp show --json` (params, metrics, the
experiment's commit), the experiment's committed dvc.lock, and its outputs through `dvc.api`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from cmkd.errors import CmkdError
from flows.dvc_cli import dvc_args, run_json, run_streaming


class ExperimentFailedError(CmkdError):
    """`dvc exp run` failed; the message ends with its last output lines."""

    def __init__(self, name: str, returncode: int, output_tail: str):
        self.name = name
        self.returncode = returncode
        super().__init__(f"experiment {name!r} failed (dvc exp run exit code {returncode}):\n{output_tail}")


@task(name="dvc-experiment", task_run_name="{name}", cache_policy=NO_CACHE)
def run_experiment(repo_root: str, name: str, overrides: list[str]) -> str:
    """`dvc exp run --temp -n <name> -S ...`, its output streamed into the task's log."""
    logger = get_run_logger()
    args = dvc_args("exp", "run", "--temp", "-n", name)
    for override in overrides:
        args += ["-S", override]
    logger.info("$ dvc exp run --temp -n %s %s (attempt %d)", name, " ".join(f"-S {o}" for o in overrides),
                max(1, task_run.run_count))
    result = run_streaming(args, repo_root, lambda line: logger.info("%s", line))
    if result.returncode != 0:
        raise ExperimentFailedError(name, result.returncode, result.output_tail)
    logger.info("%s: done in %.1f s", name, result.seconds)
    return name


def head_commit(repo_root: str | Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                          check=True).stdout.strip()


def experiment_results(repo_root: str | Path, baseline: str) -> dict[str, dict]:
    """name -> {"rev": commit, "params": {file: {...}}, "metrics": {file: {...}}} for the
    experiments of commit `baseline` (`dvc exp show --json`, DVC's documented output)."""
    shown = run_json(dvc_args("exp", "show", "--json", "--rev", baseline), repo_root)
    results = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name"):
                    results[rev["name"]] = {
                        "rev": rev.get("rev"),
                        "params": {f: (v or {}).get("data", {}) for f, v in (data.get("params") or {}).items()},
                        "metrics": {f: (v or {}).get("data", {}) for f, v in (data.get("metrics") or {}).items()},
                        "deps": data.get("deps") or {},
                    }
    return results


def _lock_stages(text: str | None) -> dict[str, Any]:
    return ((yaml.safe_load(text) if text else None) or {}).get("stages") or {}


def stage_outcomes(repo_root: str | Path, rev: str) -> dict[str, list[str]]:
    """Which stages of experiment commit `rev` have results that differ from the workspace's.

    Compares the experiment's dvc.lock with the workspace's, stage by stage (deps, params and
    outs hashes): "ran" lists the stages whose entry differs (DVC computed them, or restored a
    different earlier result from its run cache), "up_to_date" those recorded exactly as in the
    workspace."""
    root = Path(repo_root)
    shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=root, capture_output=True, text=True)
    experiment = _lock_stages(shown.stdout if shown.returncode == 0 else None)
    lock = root / "dvc.lock"
    workspace = _lock_stages(lock.read_text() if lock.is_file() else None)
    ran = [name for name, entry in experiment.items() if workspace.get(name) != entry]
    return {"ran": ran, "up_to_date": [name for name in experiment if name not in ran]}


def read_at(repo_root: str | Path, rev: str | None):
    """A reader of text files (path relative to the repo root -> text, None when missing): the
    workspace's, or with `rev` those of that commit, DVC outputs included (`dvc.api.read`)."""
    root = Path(repo_root)
    if rev is None:
        from flows.reports import workspace_reader

        return workspace_reader(root)

    import dvc.api
    from dvc.exceptions import DvcException

    def read_rev(rel: str) -> str | None:
        try:
            return dvc.api.read(rel, repo=str(root), rev=rev)
        except (DvcException, FileNotFoundError, IsADirectoryError):
            return None
    return read_rev
