"""params.yaml overrides for flow runs: validation, DVC `--set-param` syntax, and a
temporary edit of the workspace that is always undone.

Overrides are written in the syntax of `dvc exp run --set-param` (Hydra's override grammar)
and applied with DVC's own implementation of that option, so a value means the same thing
to the pipeline flow (which edits params.yaml for the length of a run) and to the sweep flow
(which passes `-S key=value` to `dvc exp run`). Every key must already exist in params.yaml
(a typo would otherwise add a key no stage reads); prefix a key with `+` to add a new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import yaml

from cmkd.errors import CmkdError, ConfigError

from flows.dvc_cli import dvc_args, run_streaming

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"
# Our files inside DVC's git-ignored temporary folder.
STATE_DIR = Path(".dvc") / "tmp" / "cmkd-flows"
BACKUP_DIR = STATE_DIR / "override-backup"
WORKSPACE_LOCK = STATE_DIR / "workspace.lock"  # flows.lock.WORKSPACE_LOCK
MANIFEST = "manifest.json"  # in BACKUP_DIR: backed-up path -> whether it existed

_KEY = re.compile(r"^\+?[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")
_DICT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class WorkspaceBusyError(CmkdError):
    """Another cmkd flow is running in this workspace."""


class InterruptedOverrideError(CmkdError):
    """A previous run with overrides died before restoring params.yaml."""


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (`2`, `[a, b]`, `true`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "expected KEY=VALUE (e.g. runs.kdv1.temperature=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {exc}") from exc
    return key, value


def _quote(text: str) -> str:
    # Hydra quoted string: a run of backslashes is literal unless it precedes a quote (or
    # the closing quote), where it must be doubled; `${` would start an interpolation.
    text = text.replace("${", "\\${")
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def override_value(value: Any, key: str = "value") -> str:
    """A Python value in `--set-param` (Hydra override) syntax; parses back to `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item, key) for item in value) + "]"
    if isinstance(value, Mapping):
        parts = []
        for name, item in value.items():
            if not isinstance(name, str) or not _DICT_KEY.match(name):
                raise ConfigError(key, f"mapping key {name!r} must be a plain identifier")
            parts.append(f"{name}:{override_value(item, key)}")
        return "{" + ",".join(parts) + "}"
    raise ConfigError(key, f"cannot pass a {type(value).__name__} as a parameter value")


def _has_key(params: Any, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def build_overrides(
    params_path: str | Path,
    *,
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[str]:
    """`--set-param` strings for the given selections and dotted-key overrides.

    Raises ConfigError naming the key when a key is malformed, given twice, or (without a
    leading '+') absent from params.yaml.
    """
    merged: dict[str, Any] = {}
    for key, chosen in (("datasets", datasets), ("methods", methods), ("seeds", seeds)):
        if chosen is not None:
            if isinstance(chosen, (str, bytes)) or not len(chosen):
                raise ConfigError(key, "must be a non-empty list")
            merged[key] = list(chosen)
    for key, value in (params or {}).items():
        if key.lstrip("+") in {k.lstrip("+") for k in merged}:
            raise ConfigError(key, "set twice (as a selection and as a parameter override)")
        merged[key] = value
    if not merged:
        return []
    params_path = Path(params_path)
    try:
        current = yaml.safe_load(params_path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(str(params_path), "file not found; overrides need a params.yaml") from exc
    overrides = []
    for key, value in merged.items():
        if not _KEY.match(key):
            raise ConfigError(key, "not a dotted parameter name (e.g. runs.kdv1.temperature)")
        if not key.startswith("+") and not _has_key(current, key):
            raise ConfigError(key, f"not in {params_path.name}; prefix it with '+' to add a new key")
        overrides.append(f"{key}={override_value(value, key)}")
    return overrides


def apply_overrides(params_path: str | Path, overrides: Sequence[str]) -> None:
    """Edit params_path in place with DVC's own `--set-param` implementation.

    A rejected override raises ConfigError naming its key (found by trying each override on
    a scratch copy, since DVC's message does not say which one failed).
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from omegaconf.errors import OmegaConfBaseException

    rejected = (InvalidArgumentError, OmegaConfBaseException)
    params_path = Path(params_path)
    original = params_path.read_bytes()
    try:
        dvc_apply_overrides(str(params_path), list(overrides))
        return
    except rejected as exc:
        params_path.write_bytes(original)
        first_error: BaseException = exc
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cmkd-params-") as tmp:
        scratch = Path(tmp) / params_path.name
        for override in overrides:
            scratch.write_bytes(original)
            try:
                dvc_apply_overrides(str(scratch), [override])
            except rejected as exc:
                detail = str(exc.__cause__ or exc).replace("\n", " ")
                raise ConfigError(override.partition("=")[0], f"rejected ({detail})") from exc
    raise ConfigError("params.yaml", f"overrides rejected together: {first_error}") from first_error


def validate_overrides(params_path: str | Path, overrides: Sequence[str]) -> None:
    """Apply `overrides` to a scratch copy of params_path: errors surface before any run."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cmkd-params-") as tmp:
        scratch = Path(tmp) / Path(params_path).name
        shutil.copy2(params_path, scratch)
        if overrides:
            apply_overrides(scratch, overrides)
        # the whole file as the stages will see it: `--datasets synthetc` is refused here
        check_project_params(Path(params_path).parent, scratch)


class ParamsCheckError(CmkdError):
    """The project's own params check (`python -m stages validate`) refused the values."""


def check_project_params(repo_root: str | Path, params_path: str | Path) -> None:
    """Run the project's up-front check of params.yaml, `python -m stages validate --params
    PATH`, where the project has one (this repository does; the flows also run any other DVC
    project, which is then not checked). Its code, in its own process, decides; its one-line
    error becomes ParamsCheckError."""
    import subprocess
    import sys

    from flows.dvc_cli import child_env

    root = Path(repo_root)
    if not (root / "stages" / "validate.py").is_file():
        return
    proc = subprocess.run([sys.executable, "-m", "stages", "validate", "--params", str(params_path)], cwd=root,
                          env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"`python -m stages validate` exited with {proc.returncode}"
        raise ParamsCheckError(message.removeprefix("error: "))


@contextlib.contextmanager
def workspace_lock(repo_root: str | Path, wait: bool = True) -> Iterator[None]:
    """One cmkd flow or `make repro` at a time per workspace (a run with overrides edits
    params.yaml, a sweep's `dvc exp run --temp` copies the workspace, and DVC fails a second
    repro at once): waits for the running one (flows.lock). Released if the process dies."""
    from flows import lock

    try:
        fd = lock.acquire(repo_root, wait=wait, log=log.info)
    except lock.WorkspaceBusy as exc:
        raise WorkspaceBusyError(str(exc)) from exc
    try:
        yield
    finally:
        os.close(fd)


def require_git_commit(repo_root: str | Path) -> None:
    """DVC experiments are git commits: they need a repository with a commit and a git identity
    (checked first, so a missing one fails before any stage runs, not after)."""
    import subprocess

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True,
                              check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    if git("rev-parse", "--verify", "--quiet", "HEAD") is None:
        raise ConfigError("params", f"{repo_root}: runs with overrides are saved as DVC "
                          "experiments, which need a git repository with at least one commit")
    for key in ("user.name", "user.email"):
        if not git("config", key):
            raise ConfigError("params", f"{repo_root}: DVC experiments are git commits and git "
                              f"has no {key}; set it with `git config {key} ...`")


def check_not_interrupted(repo_root: str | Path) -> None:
    backup = Path(repo_root) / BACKUP_DIR
    if backup.exists():
        raise InterruptedOverrideError(
            f"{repo_root}: a previous flow run with parameter overrides was interrupted, so "
            f"{PARAMS_FILE}, {LOCK_FILE} and `cache: false` outputs may still hold its results. "
            f"The files as they were before that run are in {backup}/files/ ({MANIFEST} lists "
            f"them; a path marked absent did not exist). To restore them: "
            f"`cp -a {backup}/files/. . && dvc checkout --force`, then `rm -r {backup}`; "
            f"to keep the current files instead: `rm -r {backup}`."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class OverrideSession:
    """params.yaml carries `overrides` inside the `with` block; afterwards the workspace is
    put back as it was.

    On entry params.yaml and dvc.lock are copied to BACKUP_DIR (written completely before
    it appears, so a killed run can be undone by hand; check_not_interrupted explains how),
    then the overrides are applied. `protect(paths)` adds more files to the backup (the
    `cache: false` outputs, which DVC cannot restore). On exit every backed-up file is
    put back byte for byte, files that did not exist are removed, and `dvc checkout` brings
    the cached outputs back to the restored dvc.lock. The overridden run's outputs stay in
    DVC's cache (and in the experiment the caller saved), so nothing computed is lost.
    """

    def __init__(self, repo_root: str | Path, overrides: Sequence[str],
                 on_line: Callable[[str], None] = log.info):
        self.root = Path(repo_root).resolve()
        self.overrides = list(overrides)
        self.on_line = on_line
        self.backup = self.root / BACKUP_DIR
        self._manifest: dict[str, bool] = {}

    def _save(self, rel: str, into: Path) -> None:
        src = self.root / rel
        exists = src.exists()
        if exists:
            dest = into / "files" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest, symlinks=True)
            else:
                shutil.copy2(src, dest)
        self._manifest[rel] = exists

    def _write_manifest(self, into: Path) -> None:
        (into / MANIFEST).write_text(json.dumps(self._manifest, indent=1, sort_keys=True) + "\n")

    def __enter__(self) -> "OverrideSession":
        check_not_interrupted(self.root)
        staging = self.backup.with_name(self.backup.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for rel in (PARAMS_FILE, LOCK_FILE):
            self._save(rel, staging)
        self._write_manifest(staging)
        os.replace(staging, self.backup)  # complete or absent
        try:
            apply_overrides(self.root / PARAMS_FILE, self.overrides)
        except BaseException:
            self._restore()
            raise
        self.on_line(f"params.yaml overrides for this run: {' '.join(self.overrides)}")
        return self

    def protect(self, paths: Iterable[str]) -> None:
        """Back up `paths` (relative to the repo root) too; call before anything runs."""
        for rel in sorted(set(paths)):
            rel = os.path.normpath(rel)
            if rel.startswith("..") or os.path.isabs(rel):
                raise ValueError(f"{rel}: not inside the repository {self.root}")
            if rel not in self._manifest:
                self._save(rel, self.backup)
        self._write_manifest(self.backup)

    def _restore(self) -> None:
        for rel, existed in self._manifest.items():
            dest = self.root / rel
            if not existed:
                _remove(dest)
                continue
            # Copy next to the target first, then swap: the current file stays until then.
            src, tmp = self.backup / "files" / rel, dest.with_name(f".{dest.name}.cmkd-restore")
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
            if src.is_dir():
                shutil.copytree(src, tmp, symlinks=True)
            else:
                shutil.copy2(src, tmp)
            if src.is_dir() or (dest.is_dir() and not dest.is_symlink()):
                _remove(dest)  # os.replace swaps files, not folders
            os.replace(tmp, dest)
        shutil.rmtree(self.backup, ignore_errors=True)

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()
        self.on_line("restored params.yaml, dvc.lock and uncached outputs; "
                     "checking the cached outputs out to match dvc.lock")
        result = run_streaming(dvc_args("checkout", "--force", "--allow-missing"), self.root,
                               self.on_line)
        if result.returncode != 0:
            log.error(
                "`dvc checkout` after the override run failed (exit %d); the workspace's "
                "outputs may not match dvc.lock until you run `dvc checkout`:\n%s",
                result.returncode, result.output_tail,
            )
