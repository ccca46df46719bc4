"""DVC stages `exp_<name>`: one synthetic experiment of MFH / NTDH (cmkd.experiments.analysis.EXPERIMENTS).

    python -m stages experiment mfh_gamma [--params params.yaml] [--out-dir data/reports/experiments]

Reads params `experiments.<name>`; writes <name>.json (the result:
per-point summaries over seeds, series, derived values), <name>.csv (the `dvc plots` data) and
<name>.png (the figure), each atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

from cmkd.errors import ConfigError
from cmkd.experiments.analysis import EXPERIMENTS, plot_rows, run_experiment
from cmkd.pipeline import layout
from cmkd.reporting.figures import sweep_figure
from cmkd.utils.atomic import atomic_path, write_json, write_text
from cmkd.utils.determinism import provenance
from cmkd.utils.parallel import keep_freed_memory
from stages._common import main, parser, start

log = logging.getLogger("experiment")
EXPERIMENT_THREADS = 2
# The batched ensembles allocate and free blocks of tens of MB every step, which glibc maps
# afresh each time (system time spent faulting zeroed pages); a heap that keeps freed memory
# gives the same bytes sooner, for a somewhat higher peak RSS (docs/decisions.md).
EXPERIMENT_MMAP_THRESHOLD = 1 << 30
EXPERIMENT_TRIM_THRESHOLD = 1 << 30


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--out-dir", default=str(layout.EXPERIMENTS))
    args = p.parse_args()
    # Batched ensembles are large ops: two threads, a fixed count rather than one per core,
    # since parallel reductions split by thread and the bytes must not depend on the machine.
    params = start(args, threads=EXPERIMENT_THREADS)
    keep_freed_memory(EXPERIMENT_MMAP_THRESHOLD, EXPERIMENT_TRIM_THRESHOLD)
    experiments = params.get("experiments") or {}
    if args.name not in experiments:
        raise ConfigError(f"experiments.{args.name}", "missing")
    started = time.perf_counter()
    result = run_experiment(args.name, experiments[args.name])
    log.info("%s: %.1f s", args.name, time.perf_counter() - started)
    result["provenance"] = provenance()

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


if __name__ == "__main__":
    main(run)
