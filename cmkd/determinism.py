"""Same bytes on any x86-64 machine: torch's CPU kernels pinned to one instruction-set path.

torch picks its CPU kernels by instruction set at import time (ATen's vectorised kernels, MKL,
oneDNN): the same training gives different weights on an AVX-512 machine and on an AVX2 one,
and again with MKL's and oneDNN's dispatch left free. `pin_cpu_kernels()` sets the three
switches to the AVX2 path, which every x86-64 machine of the last decade has, *before* torch is
imported (the stage package calls it first thing; it refuses to run after torch is imported,
since the switches would silently not apply). `CMKD_CPU_KERNELS=native` opts out (fastest
kernels of this machine, results tied to it). Standard library only.

The thread count matters too (parallel reductions split by thread): stages use a fixed number
of intra-op threads, never "one per core" (stages/_common.py).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, MutableMapping

#: The pinned path: ATen's AVX2 kernels, MKL's conditional numerical reproducibility on its
#: AVX2 code path, oneDNN limited to AVX2.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MODES = ("pinned", "native")


def cpu_kernel_mode(environ: MutableMapping[str, str] = os.environ) -> str:
    mode = environ.get("CMKD_CPU_KERNELS", "pinned").strip().lower() or "pinned"
    if mode not in MODES:
        raise SystemExit(f"error: CMKD_CPU_KERNELS must be one of {list(MODES)}, got {mode!r}")
    return mode


def pin_cpu_kernels(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the pinned kernel switches in `environ` (overriding the caller's values, so that a
    caller's ATEN_CPU_CAPABILITY=avx512 cannot change the results); returns what was set.
    A no-op under CMKD_CPU_KERNELS=native or off x86-64."""
    if cpu_kernel_mode(environ) == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    if environ is os.environ and "torch" in sys.modules:
        import torch

        if torch.backends.cpu.get_cpu_capability().lower() != PINNED_CPU_KERNELS["ATEN_CPU_CAPABILITY"]:
            raise RuntimeError("pin_cpu_kernels() must run before torch is imported (torch already chose its kernels)")
    environ.update(PINNED_CPU_KERNELS)
    return dict(PINNED_CPU_KERNELS)


def provenance() -> dict[str, Any]:
    """What produced a result: library versions, the CPU kernel path and the thread count."""
    import numpy
    import torch

    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": cpu_kernel_mode(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
