"""`python -m stages <name> [args]`: run the stage `stages.<name>`, the one way DVC runs a stage.

First, before anything imports torch, torch's CPU kernels are pinned (cmkd/utils/determinism.py): the
stage's results are then the same bytes on x86-64 machines of either vendor, with or without
AVX-512 (docs/portability.md; CMKD_CPU_KERNELS=native opts out). The pinning is here rather than
in the package so that importing `stages` or a stage module has no side effect.
"""

import os
import runpy
import sys

from cmkd.utils.determinism import pin_cpu_kernels  # standard library only: torch is not imported yet


def main() -> None:
    pin_cpu_kernels()
    here = os.path.dirname(__file__)
    names = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m stages {{{','.join(names)}}} [args...]")
    module = f"stages.{sys.argv[1]}"
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
