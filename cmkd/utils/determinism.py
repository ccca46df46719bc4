"""Same bytes on any x86-64 machine, whatever its vendor: torch's CPU kernels pinned.

torch picks its CPU kernels at import time, by instruction set and by CPU vendor: ATen's
vectorised kernels (AVX-512, AVX2 or plain), MKL's BLAS (on a non-Intel CPU MKL ignores an
instruction-set request such as MKL_CBWR=AVX2 and takes its own path) and oneDNN's convolutions.
`pin_cpu_kernels()` sets, *before* torch is imported:

- ATEN_CPU_CAPABILITY=avx2: ATen's AVX2 kernels, which every x86-64 machine of the last decade
  runs the same way;
- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility mode that Intel documents as
  the same results on Intel and non-Intel processors (the AVX2 branch is Intel-only);
- ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's AVX2 kernels.

The stage package calls it first thing; it refuses to run after torch is imported, since the
switches would silently not apply. `CMKD_CPU_KERNELS=native` opts out (fastest kernels of this
machine, results tied to it). What no switch pins, MKL's vector math (exp, log, sqrt of float32
tensors), training code avoids: cmkd/utils/exactmath.py. What this buys and what it costs, measured:
benchmarks/portability.py and benchmarks/cpu_pinning.py. Standard library only.

The thread count matters too (parallel reductions split by thread): stages use a fixed number
of intra-op threads, never "one per core" (stages/_common.py).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from typing import Any

#: The pinned path: ATen's AVX2 kernels, MKL's vendor-independent reproducibility mode, oneDNN
#: limited to AVX2.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
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


def cpu_identity() -> dict[str, str]:
    """The CPU's vendor and model name (/proc/cpuinfo; the platform module elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "model name") and key not in fields:
                    fields[key] = value.strip()
                if len(fields) == 2:
                    break
    except OSError:
        pass
    return {"cpu_vendor": fields.get("vendor_id") or "unknown",
            "cpu_model": fields.get("model name") or platform.processor() or "unknown"}


def provenance() -> dict[str, Any]:
    """What produced a result: library versions, the machine, every CPU kernel switch in force
    and the thread count."""
    import numpy
    import torch

    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **cpu_identity(),
        "cpu_kernels": cpu_kernel_mode(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
