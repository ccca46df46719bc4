"""Thin DVC stage entry points: `python -m stages.<name> ...` (or `python -m stages <name>`)
from the repository root.

Importing this package pins torch's CPU kernels before anything imports torch, so that a
stage's training gives the same bytes on x86-64 machines of either vendor, with or without
AVX-512 (cmkd/utils/determinism.py, docs/portability.md; CMKD_CPU_KERNELS=native opts out).
"""

from cmkd.utils.determinism import pin_cpu_kernels

pin_cpu_kernels()
