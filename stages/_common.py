"""What every stage does first: logging, params.yaml loaded and validated as a whole."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from cmkd.config import load_params, validate_params
from cmkd.errors import CmkdError, ConfigError, DataFormatError
from cmkd.parallel import available_cores

DATA = "data"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def start(args: argparse.Namespace, threads: int = 1) -> dict[str, Any]:
    """Logging, intra-op threads (CMKD_NUM_THREADS, else `threads`), params loaded and validated."""
    logging.basicConfig(level=os.environ.get("CMKD_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # One intra-op thread by default: the networks here are small, and on a shared 2-core
    # machine OpenMP's spinning threads made steps 6-25x slower (benchmarks/README.md).
    # Parallelism comes from seed workers, stages side by side (flows/) or DDP instead; the
    # experiments' batched ensembles are large enough to ask for every core.
    import torch

    torch.set_num_threads(int(os.environ.get("CMKD_NUM_THREADS", "0")) or threads)
    params = load_params(args.params)
    validate_params(params)
    return params


# Memory one seed worker may need (CMKD_SEED_WORKER_GB overrides): the largest peak measured,
# MG-KD on semantickitti-sample with its saliency passes bounded, was 1.96 GB for one seed
# (/usr/bin/time -v; benchmarks/stage_memory.py measures every stage), rounded up with margin.
SEED_WORKER_GB = 3.0


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
    """Processes that train a run's seeds side by side: CMKD_SEED_WORKERS, else one per
    available core, and no more than the available memory holds at SEED_WORKER_GB each (two
    workers of ~12 GB once had the kernel kill a stage). Safe here because start() set one
    intra-op thread before any computation."""
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
    return max(1, min(available_cores(), by_memory))


def main(run) -> None:
    """Run a stage's body; cmkd's own errors become one clear line and exit status 2."""
    try:
        run()
    except CmkdError as err:
        print(f"error: {err}", file=sys.stderr)
        # A bad params value or bad input file fails the same way every time: tell the flow
        # that started us (flows/dvc_stage.py) not to retry it.
        marker = os.environ.get("CMKD_ERROR_FILE")
        if marker and isinstance(err, (ConfigError, DataFormatError)):
            with open(marker, "w") as out:
                out.write(f"{type(err).__name__}: {err}\n")
        sys.exit(2)
