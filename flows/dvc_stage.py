"""Child process of the pipeline flow: `dvc repro --single-item STAGE` that reports what DVC did.

    python flows/dvc_stage.py STAGE RESULT_JSON [--force]      (run in the DVC project root)

It calls `Repo.reproduce(STAGE, single_item=True)`, the function behind `dvc repro
--single-item` (repo lock waited for, as `dvc --wait-for-lock`), with DVC's own console logging,
so its output is the CLI's. DVC returns the stages it reproduced (ran, or restored from its run
cache) and nothing for a stage it found up to date; that list is written to RESULT_JSON. So
"ran or up to date" is DVC's own decision at the moment it made it, not a guess from output
text or from a status taken earlier. Exit code 0 on success, 255 on a DVC error (as the CLI).

Run by file path (not `-m`), so it works whatever the current directory; it imports nothing
from this package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Run by path, Python puts this folder first on sys.path; keep it from shadowing anything.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    del sys.path[0]


NOT_RETRYABLE = 3  # flows/pipeline.py reads it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvc_stage.py", description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("result_json")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    from dvc.exceptions import DvcException  # importing dvc sets up its console logging
    from dvc.repo import Repo

    logger = logging.getLogger("dvc")
    # The stage command writes here when it failed on a bad params value or input file
    # (stages/_common.py): exit code NOT_RETRYABLE, and the flow does not retry it.
    marker = args.result_json + ".config-error"
    os.environ["CMKD_ERROR_FILE"] = marker
    try:
        try:
            repo = Repo(os.getcwd(), _wait_for_lock=True)
        except TypeError:  # a DVC without that option
            repo = Repo(os.getcwd())
        with repo:
            reproduced = repo.reproduce(args.stage, single_item=True, force=args.force)
    except DvcException:
        logger.exception("")
        return NOT_RETRYABLE if os.path.exists(marker) else 255
    with open(args.result_json, "w") as out:
        json.dump({"reproduced": [stage.addressing for stage in reproduced]}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
