"""DVC stages `exp_<name>`: one synthetic experiment of MFH / NTDH (cmkd.analysis.EXPERIMENTS).

    python -m stages.experiment mfh_gamma [--params params.yaml] [--out-dir data/reports/experiments]

Reads params `experiments.<name>` and `experiments.threads`; writes <name>.json (the result:
per-point summaries over seeds, series, derived values), <name>.csv (the `dvc plots` data) and
<name>.png (the figure), each atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from cmkd.analysis import EXPERIMENTS, plot_rows, run_experiment
from cmkd.atomic import atomic_path, write_json, write_text
from cmkd.errors import ConfigError, DataFormatError
from cmkd.figures import sweep_figure

log = logging.getLogger("experiment")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(EXPERIMENTS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-dir", default="data/reports/experiments")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = yaml.safe_load(Path(args.params).read_text()) or {}
    experiments = params.get("experiments") or {}
    if args.name not in experiments:
        raise ConfigError(f"experiments.{args.name}", "missing")
    threads = experiments.get("threads", 1)
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError("experiments.threads", f"must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)

    start = time.perf_counter()
    result = run_experiment(args.name, experiments[args.name])
    log.info("%s: %.1f s", args.name, time.perf_counter() - start)

    out = Path(args.out_dir)
    write_json(out / f"{args.name}.json", result)
    rows = plot_rows(args.name, result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / f"{args.name}.csv", buf.getvalue())
    spec = EXPERIMENTS[args.name]
    fig = sweep_figure(result, spec.x, spec.x_label, spec.panels, spec.title)
    with atomic_path(out / f"{args.name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataFormatError) as err:
        print(f"experiment: {err}", file=sys.stderr)
        sys.exit(2)
