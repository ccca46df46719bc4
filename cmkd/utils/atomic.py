"""Write-then-rename helpers, so an interrupted stage never leaves a half-written output.

Temporary names carry the writing process's PID (`.<name>.<pid>-<random>.tmp`): a run killed
with SIGKILL cannot clean up after itself, so the next writer into the same folder removes the
temporaries whose owner is no longer alive (`remove_stale`), and every stage sweeps the data
folders at its start (`remove_stale_tree`): an output DVC restores from its run cache is never
written again, so its killed writer's temporaries would otherwise stay. Temporaries are created with the
permissions the umask gives a new file or folder (mkstemp / mkdtemp alone would give 0600 /
0700), since they become the outputs.

A temporary folder may live in a `scratch` folder rather than beside its target, so that it is
never inside another stage's dependency (`data/runs/<ds>` is one: a `.teacher.*.tmp` in it
would change what `evaluate` sees); the scratch folder must be on the same filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `.<name>.<pid>-<random>.tmp`, `.<name>.<pid>-old.tmp`, or `.<name>.<pid>.tmp` (PreparedWriter).
_TMP_NAME = re.compile(r"^\..*\.(\d+)(?:-[A-Za-z0-9_]+)?\.tmp$")


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def owner_pid(name: str) -> int | None:
    """The PID in a temporary's name, or None when the name is not one of ours."""
    match = _TMP_NAME.match(name)
    return int(match.group(1)) if match else None


def remove_stale(folder: str | Path, prefix: str = ".") -> list[Path]:
    """Remove the temporaries in `folder` (names starting with `prefix`) whose owner process is
    dead; return what was removed. Others' live temporaries are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid = owner_pid(entry.name)
        if pid is None or not entry.name.startswith(prefix) or pid_alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass  # another process cleaned it first
        except OSError as err:  # e.g. another user's, in a shared checkout: not worth failing a stage
            logging.getLogger(__name__).warning("could not remove %s, a killed run's temporary: %s", entry.path, err)
    return removed


def remove_stale_tree(root: str | Path, shallow: tuple[str | Path, ...] = ()) -> list[Path]:
    """`remove_stale` in `root` and every folder below it; a folder in `shallow` is searched at
    its own level only (data/raw may hold a user's extracted dataset: tens of thousands of
    files that no stage writes beside). A temporary folder is removed whole or, when its owner
    is alive, left alone: never searched inside."""
    shallow_dirs = {os.path.normpath(p) for p in shallow}
    removed = []
    for folder, subdirs, _ in os.walk(root):
        removed += remove_stale(folder)
        if os.path.normpath(folder) in shallow_dirs:
            subdirs.clear()
        else:
            subdirs[:] = [d for d in subdirs if owner_pid(d) is None]
    return removed


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, prefix=f".{final.name}.")
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(final), suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path, scratch: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder (in `scratch`, else beside `final`); it replaces `final` only
    if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    where = Path(scratch) if scratch is not None else final.parent
    where.mkdir(parents=True, exist_ok=True)
    remove_stale(where, prefix=f".{final.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), suffix=".tmp", dir=where))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        if final.exists():
            old = where / f".{final.name}.{os.getpid()}-old.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, so diffs stay readable)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
