"""Reports: aggregate per-run metrics over seeds, tables in the papers' style, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cmkd.metrics import primary_metric

BASELINES = ("teacher", "student")


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    # Sample standard deviation (ddof=1) as the papers' "mean +- std over runs"; 0 for one seed.
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr], "n": int(len(arr))}


def aggregate_run(run_metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{deployable: {metric: {mean, std, values, n}}} over the seeds of one run."""
    per_deployable: dict[str, dict[str, list[float]]] = {}
    for seed_result in run_metrics["seeds"].values():
        for name, metrics in seed_result["test"].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)):
                    per_deployable.setdefault(name, {}).setdefault(metric, []).append(float(value))
    return {name: {m: _mean_std(v) for m, v in metrics.items()} for name, metrics in per_deployable.items()}


def collect(run_dirs: Iterable[Path]) -> dict[str, Any]:
    """Read every run's metrics.json into one dict keyed by row name.

    The trained network of a run is its row (`teacher`, `student`, `kdv1`, ...); runs with
    several deployable networks (DisCoM-KD) add one row per extra network, `<run>/<name>`.
    """
    rows: dict[str, Any] = {}
    task = None
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        metrics = json.loads(path.read_text())
        task = metrics["task"]
        if metrics.get("skipped"):  # the method is not defined for this task: an n/a row
            rows[metrics["run"]] = {"method": metrics["method"], "skipped": metrics["skipped"]}
            continue
        agg = aggregate_run(metrics)
        main = "model" if "model" in agg else "student"
        rows[metrics["run"]] = {"method": metrics["method"], **agg[main]}
        for name, values in agg.items():
            if name != main:
                rows[f"{metrics['run']}/{name}"] = {"method": metrics["method"], **values}
    return {"task": task, "metric": primary_metric(task) if task else None, "rows": rows}


def _fmt(stat: Mapping[str, Any], scale: float = 100.0) -> str:
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


def markdown_table(report: Mapping[str, Any], dataset: str, modalities: tuple[str, str]) -> str:
    """The papers' table: one row per run, mean ± std (x100), arrow against STUDENT."""
    metric = report["metric"]
    rows = report["rows"]
    student = rows.get("student", {}).get(metric)
    lines = [
        f"### {dataset}: {modalities[0]} → {modalities[1]} ({metric.replace('_', ' ')} × 100, mean ± std over seeds)",
        "",
        f"| run | method | {metric} | vs STUDENT |",
        "|---|---|---|---|",
    ]
    order = [r for r in BASELINES if r in rows] + sorted(r for r in rows if r not in BASELINES)
    for name in order:
        stat = rows[name].get(metric)
        if rows[name].get("skipped"):
            lines.append(f"| {name} | {rows[name]['method']} | n/a | skipped: {rows[name]['skipped']} |")
            continue
        if stat is None:
            continue
        arrow = ""
        if student is not None and name not in BASELINES:
            delta = 100 * (stat["mean"] - student["mean"])
            arrow = f"{'↑' if delta > 0 else '↓' if delta < 0 else '='} {delta:+.2f}"
        label = name.upper() if name in BASELINES else name
        lines.append(f"| {label} | {rows[name]['method']} | {_fmt(stat)} | {arrow} |")
    n = max((rows[r][metric]["n"] for r in rows if metric in rows[r]), default=0)
    lines += ["", f"Seeds per row: {n}. Arrows compare the mean with STUDENT (no KD)."]
    return "\n".join(lines) + "\n"


def scores_csv(report: Mapping[str, Any]) -> str:
    """One line per row for `dvc plots` (bar chart of the primary metric)."""
    metric = report["metric"]
    lines = ["run,mean,std"]
    for name, row in report["rows"].items():
        if metric in row:
            lines.append(f"{name},{row[metric]['mean']:.6f},{row[metric]['std']:.6f}")
    return "\n".join(lines) + "\n"


def bar_figure(report: Mapping[str, Any], dataset: str, path: Path) -> None:
    """Horizontal bars with std error bars; the STUDENT mean drawn as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    rows = [(n, r[metric]) for n, r in report["rows"].items() if metric in r]
    rows.sort(key=lambda item: item[1]["mean"])
    names = [n for n, _ in rows]
    means = np.array([s["mean"] for _, s in rows]) * 100
    stds = np.array([s["std"] for _, s in rows]) * 100
    student = report["rows"].get("student", {}).get(metric)
    colors = ["#888888" if n in BASELINES else ("#2a9d8f" if student and m >= 100 * student["mean"] else "#e76f51")
              for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, means, xerr=stds, color=colors, capsize=3)
    if student is not None:
        ax.axvline(100 * student["mean"], color="black", linestyle="--", linewidth=1, label="STUDENT")
        ax.legend(loc="lower right")
    lo = max(0.0, math.floor(means.min() - stds.max() - 5)) if len(means) else 0
    ax.set_xlim(left=lo)
    ax.set_xlabel(f"{metric} × 100 (mean ± std over seeds)")
    ax.set_title(dataset)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
