"""`python -m stages <name> [args]`: run the stage `stages.<name>` (as `python -m stages.<name>`
would): in this process, or, with CMKD_STAGE_SERVER=1 (an opt-in speed mode), in a process forked
from a warm stage server (see stages/_server.py for what that changes)."""

import os
import runpy
import sys

from stages import _server  # standard library only: this process stays light


def main() -> None:
    names = sorted(f[:-3] for f in os.listdir(os.path.dirname(__file__)) if f.endswith(".py") and not f.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m stages {{{','.join(names)}}} [args...]")
    module = f"stages.{sys.argv[1]}"
    code = _server.delegate(module, sys.argv[2:])
    if code is not None:
        sys.exit(code)
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


main()
