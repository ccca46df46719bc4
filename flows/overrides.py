"""params.yaml overrides for flow runs, in the syntax of `dvc exp run -S/--set-param`.

An override is a `KEY=VALUE` string in Hydra's override grammar (`runs.kdv1.temperature=2`,
`datasets=[synthetic,digits]`, `+new.key=1` to add a key). The flows pass these strings to
`dvc exp run -S` unchanged: DVC applies them, so a value means what it means to DVC.

Before any run starts, `validate_overrides` applies them to a scratch copy of params.yaml with
Hydra's public compose API (the machinery DVC's `-S` is built on: same grammar, keys must exist
unless prefixed with `+`) and runs the project's own check of the whole file (`python -m stages
validate`), so a typo fails in one line naming the key, not minutes later inside an experiment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cmkd.errors import CmkdError, ConfigError
from flows.dvc_cli import child_env


class ParamsCheckError(CmkdError):
    """The project's own params check (`python -m stages validate`) refused the values."""


def selection_overrides(
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """`datasets=[...]`, `methods=[...]`, `seeds=[...]` overrides for the lists given."""
    overrides = []
    for key, chosen in (("datasets", datasets), ("methods", methods), ("seeds", seeds)):
        if chosen is None:
            continue
        if isinstance(chosen, (str, bytes)) or not len(chosen):
            raise ConfigError(key, "must be a non-empty list")
        # JSON strings and integers are valid Hydra values (double-quoted strings, ints)
        overrides.append(f"{key}=[{','.join(json.dumps(item) for item in chosen)}]")
    return overrides


def override_key(override: str) -> str:
    """The dotted key of `KEY=VALUE`, without Hydra's `+`/`~` prefix."""
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(override, "expected KEY=VALUE (e.g. runs.kdv1.temperature=2)")
    return key.strip().lstrip("+~")


def check_unique(overrides: Sequence[str]) -> None:
    seen: set[str] = set()
    for override in overrides:
        key = override_key(override)
        if key in seen:
            raise ConfigError(key, "set twice")
        seen.add(key)


def _composed(params_file: Path, overrides: Sequence[str]) -> dict:
    """params_file with `overrides` applied by Hydra's compose API (its grammar and key checks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(params_file.parent.resolve()), version_base=None):
            config = compose(config_name=params_file.stem, overrides=list(overrides))
    except HydraException as exc:
        message = " ".join(str(exc).split())
        key = next((override_key(o) for o in overrides if f"'{override_key(o)}'" in message), "params")
        raise ConfigError(key, f"override rejected: {message}") from exc
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(config, resolve=False)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def validate_overrides(params_file: str | Path, overrides: Sequence[str]) -> None:
    """Refuse bad overrides and bad params before any run: ConfigError / ParamsCheckError name the key.

    Only the overridden keys take Hydra's values; every other value stays as params.yaml has it.
    """
    params_file = Path(params_file)
    if not params_file.is_file():
        raise ConfigError(str(params_file), "file not found")
    check_unique(overrides)
    with tempfile.TemporaryDirectory(prefix="cmkd-params-") as tmp:
        scratch = Path(tmp) / params_file.name
        if overrides:
            composed = _composed(params_file, overrides)
            params = yaml.safe_load(params_file.read_text()) or {}
            for override in overrides:
                key = override_key(override)
                if override.lstrip().startswith("~"):
                    continue  # a deletion: Hydra checked the key exists
                _set(params, key, _get(composed, key))
            scratch.write_text(yaml.safe_dump(params, sort_keys=False))
        else:
            scratch.write_bytes(params_file.read_bytes())
        check_project_params(params_file.parent, scratch)


def check_project_params(repo_root: str | Path, params_path: str | Path) -> None:
    """Run the project's up-front check of params.yaml, `python -m stages validate --params
    PATH`, where the project has one (this repository does; the flows also run any other DVC
    project, which is then not checked). Its code, in its own process, decides; its one-line
    error becomes ParamsCheckError."""
    root = Path(repo_root)
    if not (root / "stages" / "validate.py").is_file():
        return
    proc = subprocess.run([sys.executable, "-m", "stages", "validate", "--params", str(params_path)], cwd=root,
                          env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"`python -m stages validate` exited with {proc.returncode}"
        raise ParamsCheckError(message.removeprefix("error: "))


def require_git_commit(repo_root: str | Path) -> None:
    """DVC experiments are git commits: they need a repository with a commit and a git identity
    (checked first, so a missing one fails before any stage runs, not after)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    if git("rev-parse", "--verify", "--quiet", "HEAD") is None:
        raise ConfigError("params", f"{repo_root}: runs with overrides are DVC experiments, which need a "
                          "git repository with at least one commit")
    if git("var", "GIT_COMMITTER_IDENT") is None:
        raise ConfigError("params", f"{repo_root}: DVC experiments are git commits and git has no identity; "
                          "set one with `git config user.name ...` and `git config user.email ...`")
