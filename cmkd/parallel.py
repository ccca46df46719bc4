"""Process-level parallelism helpers shared by the data preparation and the training pipeline
(standard library only: prepare workers import this without torch)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys


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
