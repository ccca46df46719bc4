"""One `dvc repro` (or cmkd flow) at a time per workspace; the others wait for it.

DVC locks each running stage's outputs, so a second `dvc repro` in the same workspace fails at
once ("... is busy"), `--wait-for-lock` included (that flag waits for DVC's short repo lock
only). `make repro` and the flows therefore take this workspace lock first and wait for it:

    python -m flows.lock dvc repro [targets...]     # what `make repro` runs

The lock is an exclusive `flock` on `.dvc/tmp/cmkd-flows/workspace.lock` (the file holds the
owner's PID, for the waiting message). The kernel releases it when its holder dies, so a killed
run never leaves the workspace locked. Standard library only: starting this costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

WORKSPACE_LOCK = Path(".dvc") / "tmp" / "cmkd-flows" / "workspace.lock"


class WorkspaceBusy(RuntimeError):
    """The workspace is locked and the caller chose not to wait."""


def _owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"


def acquire(repo_root: str | Path, wait: bool = True, log: Callable[[str], None] | None = None) -> int:
    """Lock the workspace at `repo_root`; the open descriptor that holds the lock (close it to
    release). Waits for the current holder unless `wait` is False (then WorkspaceBusy)."""
    import fcntl

    path = Path(repo_root) / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            if not wait:
                raise WorkspaceBusy(f"{repo_root}: another run holds this workspace (pid {owner}, lock {path})") \
                    from None
            (log or _stderr)(f"waiting for the run in this workspace to finish (pid {owner}, lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def workspace_lock(repo_root: str | Path, wait: bool = True,
                   log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the workspace lock for the body (see acquire)."""
    fd = acquire(repo_root, wait=wait, log=log)
    try:
        yield
    finally:
        os.close(fd)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    if argv[0] == "--":
        argv = argv[1:]
    if sys.platform == "win32":  # no flock: run unlocked, as before
        os.execvp(argv[0], argv)
    fd = acquire(".")
    os.set_inheritable(fd, True)  # the command holds the lock for as long as it runs
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
