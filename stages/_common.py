"""What every stage does first: logging, params.yaml loaded and validated as a whole."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from cmkd.config import load_params, validate_params
from cmkd.errors import CmkdError, ConfigError, DataFormatError
from cmkd.pipeline import layout
from cmkd.utils.atomic import remove_stale, remove_stale_tree
from cmkd.utils.determinism import PINNED_CPU_KERNELS, pin_cpu_kernels
from cmkd.utils.parallel import available_cores

# Left-overs of killed runs under SCRATCH are removed by the next stage that starts (sweep_stale,
# by owner PID).
DATA, SCRATCH, METRICS, RAW = str(layout.DATA), str(layout.SCRATCH), str(layout.METRICS), str(layout.RAW)


def sweep_stale() -> list:
    """Remove the temporaries of killed stages (dead owner PID) under data/ and metrics/ and
    beside the top-level files (README.md, tuned.yaml). A SIGKILLed stage cannot remove its
    own, and when DVC restores its output from the run cache no later writer of that output
    would (they sweep only their own names). Live stages' temporaries are left alone."""
    removed = remove_stale(".") + remove_stale_tree(DATA, shallow=(RAW,)) + remove_stale_tree(METRICS)
    if removed:
        logging.getLogger("stages").warning("removed %d temporaries of killed runs: %s", len(removed),
                                            ", ".join(map(str, removed)))
    return removed


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def start(args: argparse.Namespace, threads: int = 1, data_only: bool = False) -> dict[str, Any]:
    """Logging, intra-op threads (CMKD_NUM_THREADS, else `threads`), params loaded and validated.

    `data_only` (download, prepare): only the datasets, seeds and data sections are checked, and
    torch is not imported (seconds of start-up those stages do not need; a dataset that does
    use torch, such as digits' resizing, imports it itself and sets the same thread count)."""
    logging.basicConfig(level=os.environ.get("CMKD_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    require_pinned_kernels()
    # One intra-op thread by default: the networks here are small, and on a shared machine
    # OpenMP's spinning threads make their steps several times slower.
    # Parallelism comes from seed workers, stages side by side (flows/) or DDP instead; the
    # experiments' batched ensembles are large enough to ask for every core.
    nthreads = int(os.environ.get("CMKD_NUM_THREADS", "0")) or threads
    if data_only:
        _set_torch_threads_when_imported(nthreads)
    else:
        import torch

        torch.set_num_threads(nthreads)
    params = load_params(args.params)
    validate_params(params, data_only=data_only)
    return params


def require_pinned_kernels() -> None:
    """Stop a stage whose CPU kernels were not pinned before torch was imported (it was not started
    as `python -m stages <name>`, e.g. as `python -m stages.train`): its results would be this
    machine's, not the portable ones."""
    expected = pin_cpu_kernels(dict(os.environ))  # a copy: only what the entry point would have set
    if any(os.environ.get(name) != value for name, value in expected.items()):
        raise SystemExit(f"error: torch's CPU kernels are not pinned ({', '.join(PINNED_CPU_KERNELS)}): "
                         "run a stage as `python -m stages <name> ...` (or set CMKD_CPU_KERNELS=native)")


def _set_torch_threads_when_imported(nthreads: int) -> None:
    """torch.set_num_threads(nthreads) as soon as (and only if) the stage imports torch."""
    import importlib.abc
    import importlib.util

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_set(module):
                    exec_module(module)
                    module.set_num_threads(nthreads)

                spec.loader.exec_module = exec_and_set
            return spec

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(nthreads)
    else:
        sys.meta_path.insert(0, _Hook())


# Memory one seed worker may need (CMKD_SEED_WORKER_GB overrides): the largest one-seed peak of
# any stage (benchmarks/stage_memory.py -> benchmarks/results/stage_memory.json), with margin.
SEED_WORKER_GB = 3.0
MAX_SEED_WORKERS = 8


def available_memory_gb() -> float | None:
    """MemAvailable of /proc/meminfo, capped by this cgroup's memory limit; None if unknown."""
    values = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    values.append(int(line.split()[1]) / 2**20)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            values.append((int(limit) - used) / 2**30)
    except (OSError, ValueError):
        pass
    return min(values) if values else None


def seed_workers() -> int:
    """Processes that train a run's seeds side by side: CMKD_SEED_WORKERS, else one per seed
    (the caller caps it at the number of seeds) up to MAX_SEED_WORKERS, and no more than the
    available memory holds at SEED_WORKER_GB each (more would have the kernel kill the stage).
    More single-threaded workers than cores is on purpose: 5 seeds on 2 cores in 5 processes
    finish in 2.5 seed-times, in 2 processes in 3. Safe here because start() set one intra-op
    thread before any computation."""
    env = os.environ.get("CMKD_SEED_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise SystemExit(f"error: CMKD_SEED_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    try:
        per_worker = float(os.environ.get("CMKD_SEED_WORKER_GB", "") or SEED_WORKER_GB)
    except ValueError:
        raise SystemExit("error: CMKD_SEED_WORKER_GB must be a number of GiB") from None
    memory = available_memory_gb()
    by_memory = available_cores() if memory is None else max(1, int(memory // max(per_worker, 0.1)))
    return max(1, min(max(available_cores(), MAX_SEED_WORKERS), by_memory))


def main(run) -> None:
    """Sweep killed runs' temporaries, then run a stage's body; cmkd's own errors become one
    clear line and exit status 2."""
    try:
        sweep_stale()
        run()
    except CmkdError as err:
        print(f"error: {err}", file=sys.stderr)
        # A bad params value or bad input file fails the same way every time: tell the flow
        # that started us (flows/pipeline.py) not to retry it.
        marker = os.environ.get("CMKD_ERROR_FILE")
        if marker and isinstance(err, (ConfigError, DataFormatError)):
            with open(marker, "w") as out:
                out.write(f"{type(err).__name__}: {err}\n")
        sys.exit(2)
