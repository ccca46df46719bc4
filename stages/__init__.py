"""Thin DVC stage entry points: `python -m stages.<name> ...` (or `python -m stages <name>`)
from the repository root.

Importing this package pins torch's CPU kernels to one instruction-set path before anything
imports torch, so every stage gives the same bytes on any x86-64 machine (cmkd/determinism.py;
CMKD_CPU_KERNELS=native opts out).
"""

from cmkd.determinism import pin_cpu_kernels

pin_cpu_kernels()
