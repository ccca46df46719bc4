"""Per-epoch learning curves from the DVCLive logs of every run, for `dvc plots show`.

Each seed of a run logs `<run_dir>/seed<k>/live/plots/metrics/{train,val}/<name>.tsv`
(columns step, <name>; cmkd/training/live.py). `curves_csv` gathers one metric of every run into one
long table (run, epoch, score = mean over seeds), drawn with one line per run by the `curves` template
(.dvc/plots/curves.json)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path


def read_tsv(path: Path) -> dict[int, float]:
    """step -> value of one DVCLive metric file."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return {}
        return {int(row[0]): float(row[1]) for row in reader if row}


def run_curve(run_dir: Path, split: str, metric: str) -> dict[int, float]:
    """epoch -> mean over the run's seeds of `split/metric` (seeds that logged that epoch)."""
    per_epoch: dict[int, list[float]] = {}
    for path in sorted(Path(run_dir).glob(f"seed*/live/plots/metrics/{split}/{metric}.tsv")):
        for step, value in read_tsv(path).items():
            per_epoch.setdefault(step, []).append(value)
    return {step: sum(v) / len(v) for step, v in sorted(per_epoch.items())}


def curves_csv(run_dirs: Iterable[Path], split: str, metric: str) -> str:
    """`run,epoch,score` lines (score: `split/metric`, mean over seeds) for every run that
    logged the metric. One column name for every dataset, so dvc.yaml names it once."""
    lines = ["run,epoch,score"]
    for run_dir in run_dirs:
        for step, value in run_curve(Path(run_dir), split, metric).items():
            lines.append(f"{Path(run_dir).name},{step},{value:.6f}")
    return "\n".join(lines) + "\n"
