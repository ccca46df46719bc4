"""Process-level parallelism helpers shared by the data preparation and the training pipeline
(standard library only: prepare workers import this without torch)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import sys
from collections.abc import Iterator


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent() -> None:
    """For a worker process's initializer: the worker is killed with its parent, so a SIGKILLed
    stage leaves no worker behind (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int, trim_threshold: int) -> bool:
    """Have glibc's malloc serve blocks under `mmap_threshold` bytes from the heap and keep up to
    `trim_threshold` bytes of freed heap for reuse. By default a block over 32 MB gets a fresh
    mapping and goes back to the kernel when freed, so a loop that allocates and frees large
    arrays page-faults zeroed pages every time: system time, never arithmetic, so results do not
    change. The process keeps memory up to its peak instead. Process-wide and not undone; for a
    stage or worker process that owns its memory use. True when both settings took effect
    (False off Linux or on a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))) & bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))


# Named kernel objects (POSIX shared memory, semaphores) outlive a process killed with SIGKILL
# together with its resource tracker (`kill -9` of the process group). Ours carry the creating
# process's PID in their names, so the next run removes those whose owner is dead.
SHM_PREFIX = "cmkd-"
_SHM_DIR = "/dev/shm"
_OWNED = re.compile(r"^(?:sem\.)?cmkd-(\d+)-[0-9a-z_]+$")


def shm_name() -> str:
    """A fresh shared-memory name owned by this process (`cmkd-<pid>-<random>`)."""
    return f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


@contextlib.contextmanager
def pid_named_semaphores() -> Iterator[None]:
    """Semaphores created in the block (e.g. a ProcessPoolExecutor's queues, which a forkserver
    or spawn context keeps named until the pool is finalised) are named `cmkd-<pid>-<n>`."""
    from multiprocessing import synchronize

    original = synchronize.SemLock.__dict__["_make_name"]
    synchronize.SemLock._make_name = staticmethod(
        lambda: f"/{SHM_PREFIX}{os.getpid()}-{next(synchronize.SemLock._rand)}")
    try:
        yield
    finally:
        synchronize.SemLock._make_name = original


def remove_dead_shm(folder: str = _SHM_DIR) -> list[str]:
    """Unlink this user's `cmkd-<pid>-*` segments and semaphores whose owner process is dead."""
    from cmkd.utils.atomic import pid_alive

    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no /dev/shm (not Linux)
        return removed
    for entry in entries:
        match = _OWNED.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass  # removed meanwhile, or not ours to remove
    return removed
