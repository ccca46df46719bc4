"""Stage `method_code`: per distillation run, the hash of every source file of its method
(cmkd/codedeps.py) -> data/method_code/<run>.json. Each `distill@<dataset>-<run>` stage depends
on its run's file, so editing or adding one method module reruns only the runs that use it.

Reads the source with `ast` and never imports torch: the stage takes well under a second."""

import json
from pathlib import Path

from cmkd.atomic import atomic_dir
from cmkd.codedeps import run_code
from cmkd.config import load_params
from cmkd.errors import ConfigError
from stages._common import DATA, main, parser


def run() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    runs = params.get("runs") or {}
    root = Path.cwd()
    with atomic_dir(Path(DATA) / "method_code") as out:
        for name in params.get("methods") or []:
            if name not in runs:
                raise ConfigError("methods", f"unknown run {name!r}: not a key of `runs` (known: {sorted(runs)})")
            code = {"run": name, "files": run_code(root, runs[name])}
            (out / f"{name}.json").write_text(json.dumps(code, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(run)
