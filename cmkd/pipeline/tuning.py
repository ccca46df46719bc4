"""The tuning protocol: every method's own hyper-parameters chosen on the validation split, from
a declared grid, with the same budget for every method and seeds apart from the reporting seeds.

params.yaml's `tuning` section:

    tuning:
      seeds: [100, 101]          # tuning seeds; must not intersect the reporting `seeds`
      budget: 8                  # configurations trained per run (x tuning seeds x the run's epochs)
      subsample_seed: 0          # which configurations a grid larger than the budget keeps
      grids:
        dkd: {beta: [0.5, 1, 2, 8], temperature: [1, 4]}
        kdv1_ntdh: {base.temperature: [...]}   # dotted keys reach nested entries

Budget: every run trains exactly `budget` configurations, each on every tuning seed, for the
epochs of the distill runs (`train.<dataset>.student`), so no method gets more tries than
another. A grid is the Cartesian product of its lists, in the declared key order (the last key
varies fastest). A grid larger than the budget keeps `budget` configurations drawn without
replacement by a permutation seeded with `subsample_seed` (then put back in grid order); a grid
smaller than the budget is an error (declare more values): padding it with repeats would spend
the budget on identical trainings.

Selection: for each configuration the validation split's primary metric (weighted F1 or mIoU)
of the best epoch, averaged over the tuning seeds; the highest mean wins, ties to the first in
grid order. Training during tuning never evaluates the test split (`evaluate_test=False`), so
no test number can reach the selection.

The selection is `tuned.yaml`: `<run>: {<dataset>: {param: value}}` (dotted keys), merged over
`runs.<run>` by the distill stages; a dataset absent under a run means "not tuned" (the run's
values from params.yaml, `selected_on: default`). Run-major, with every key of `runs` present,
so that the distill stages can list `tuned.yaml: [<run>]` as DVC params for any dataset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cmkd.config import _deep_copy, apply_overrides, budgeted_configs, expand_grid
from cmkd.errors import ConfigError
from cmkd.pipeline.layout import TUNED_FILE

# ---------------------------------------------------------------------------- configuration


def grid_for(params: Mapping[str, Any], run: str) -> dict[str, list]:
    grids = (params.get("tuning") or {}).get("grids") or {}
    if run not in grids:
        raise ConfigError(f"tuning.grids.{run}", "missing: declare the run's grid to tune it")
    return dict(grids[run])


# ---------------------------------------------------------------------------- the selection file


def load_tuned(path: str | Path = TUNED_FILE) -> dict[str, Any]:
    """tuned.yaml as a mapping (an absent file: nothing tuned)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"is not valid YAML: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(str(path), "must map runs to {dataset: {param: value}} mappings")
    return data


def tuned_run_config(run_cfg: Mapping[str, Any], tuned: Mapping[str, Any],
                     dataset: str, run: str) -> tuple[dict[str, Any], str]:
    """The run's configuration with its selected values merged in, and where they came from:
    ("val" when tuned.yaml holds a selection for (run, dataset), else "default")."""
    selection = (tuned.get(run) or {}).get(dataset) or {}
    if not isinstance(selection, Mapping):
        raise ConfigError(f"{TUNED_FILE}: {run}.{dataset}", f"must be a mapping of parameter values, got {selection!r}")
    if not selection:
        return _deep_copy(run_cfg), "default"
    return apply_overrides(run_cfg, selection), "val"


def update_tuned(tuned: Mapping[str, Any], runs: Sequence[str], dataset: str,
                 selected: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """tuned.yaml's content after a selection on `dataset`: one key per run of params.yaml's
    `runs` (others dropped), `selected[run]` under `dataset` for the tuned runs, and `dataset`
    removed under every other run (its values are then params.yaml's)."""
    out = {}
    for run in runs:
        by_dataset = {d: dict(v) for d, v in (tuned.get(run) or {}).items() if d != dataset}
        if selected.get(run):
            by_dataset[dataset] = dict(selected[run])
        out[run] = by_dataset
    return out


def render_tuned(tuned: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    header = ("# Hyper-parameters selected on the validation split by the tuning protocol (README,\n"
              "# \"Tuning protocol\"): <run>: {<dataset>: {param: value}}. Written by\n"
              "# `python -m stages tune --dataset D --select`; regenerate with `dvc repro tuning/dvc.yaml`.\n"
              "# The distill stages merge it over params.yaml's runs.<run>; a dataset absent under a run\n"
              "# = not tuned (params.yaml's values, selected_on: default). Every run of `runs` has a key.\n")
    return header + yaml.safe_dump({r: {d: dict(v) for d, v in by_ds.items()} for r, by_ds in tuned.items()},
                                   sort_keys=True, default_flow_style=None, width=120)


# ---------------------------------------------------------------------------- selection


def select(configs: Sequence[Mapping[str, Any]]) -> int:
    """Index of the configuration with the highest mean validation score (ties: the first).
    Each entry has `val_scores` {seed: score}; only these are read."""
    best, best_mean = -1, -math.inf
    for i, cfg in enumerate(configs):
        scores = list(cfg["val_scores"].values())
        mean = float(np.mean(scores))
        if mean > best_mean:
            best, best_mean = i, mean
    return best


def tune_run(*, dataset: str, prepared: Path, run_name: str, run_cfg: Mapping[str, Any],
             grid: Mapping[str, Sequence[Any]],
             budget: int, subsample_seed: int, seeds: Sequence[int], models: Mapping[str, Any], train_cfg,
             teacher_dir: Path | None, teacher_train_cfg, work_dir: Path, seed_workers: int = 1,
             progress: bool = False) -> dict[str, Any]:
    """Train every budgeted configuration of `grid` on the tuning `seeds` and select on val.

    Reuses `cmkd.pipeline.train.train_run` (the engine, seed workers) with the test split never
    evaluated. Returns the run's evidence: every configuration's val score per seed, its mean,
    the chosen configuration and the seconds spent."""
    from cmkd.data.h5 import read_attrs
    from cmkd.pipeline.train import skip_reason, train_run
    from cmkd.training.metrics import primary_metric

    attrs = read_attrs(prepared)
    metric = primary_metric(attrs["task"])
    configs = budgeted_configs(grid, budget, subsample_seed, f"tuning.grids.{run_name}")
    skipped = skip_reason(run_cfg["method"], dataset, prepared, attrs)
    if skipped:  # n/a here (AT on vector data): nothing to select, the row is skipped
        return {"dataset": dataset, "run": run_name, "method": run_cfg["method"], "metric": metric, "split": "val",
                "seeds": list(seeds), "budget": budget, "epochs": int(train_cfg.epochs),
                "grid": {k: list(v) for k, v in grid.items()}, "grid_size": len(expand_grid(grid)),
                "configurations": [], "selected_index": None, "selected": {}, "selected_val_mean": None,
                "skipped": skipped, "seconds": 0.0}
    _preload()
    entries = []
    start = time.perf_counter()
    for i, overrides in enumerate(configs):
        cfg = apply_overrides(run_cfg, overrides)
        t0 = time.perf_counter()
        result = train_run(dataset=dataset, prepared=prepared, run_name=run_name, run_cfg=cfg, models=models,
                           train_cfg=train_cfg, seeds=seeds, out_dir=work_dir / f"config{i}", checkpoint_root=None,
                           teacher_dir=teacher_dir, teacher_train_cfg=teacher_train_cfg, progress=progress,
                           seed_workers=seed_workers, evaluate_test=False, write_metrics=False)
        entry = {
            "config": dict(overrides),
            "val_scores": {s: float(r["val"][metric]) for s, r in result["seeds"].items()},
            "best_epoch": {s: int(r["best_epoch"]) for s, r in result["seeds"].items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        extras = {s: r["method"] for s, r in result["seeds"].items() if "method" in r}
        if extras:
            entry["method"] = extras
        entry["val_mean"] = float(np.mean(list(entry["val_scores"].values())))
        entries.append(entry)
    chosen = select(entries)
    return {
        "dataset": dataset, "run": run_name, "method": run_cfg["method"], "metric": metric, "split": "val",
        "seeds": list(seeds), "budget": budget, "epochs": int(train_cfg.epochs),
            "grid": {k: list(v) for k, v in grid.items()},
        "grid_size": len(expand_grid(grid)), "configurations": entries, "selected_index": chosen,
        "selected": dict(entries[chosen]["config"]), "selected_val_mean": entries[chosen]["val_mean"],
        "seconds": round(time.perf_counter() - start, 2),
    }


def _preload() -> None:
    """Import, once in this process, what every training imports lazily (the optimisers'
    torch._dynamo, DVCLive, torchmetrics: ~5 s of CPU). train_run forks seed workers per
    configuration; without this each of them would import it again."""
    import importlib

    for name in ("torch._dynamo", "dvclive", "torchmetrics"):
        importlib.import_module(name)


# ---------------------------------------------------------------------------- evidence report


def report_markdown(dataset: str, runs: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> str:
    """The evidence as Markdown: per run, every configuration's val score per tuning seed."""
    lines = [f"# Tuning on `{dataset}` (validation split, mean over tuning seeds)", ""]
    if extra:
        for k, v in extra.items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lines += ["| run | selected | val × 100 | configurations | seconds |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        if r.get("skipped"):
            lines.append(f"| {name} | n/a ({r['skipped']}) | | | |")
            continue
        sel = ", ".join(f"{k}={v}" for k, v in r["selected"].items())
        lines.append(f"| {name} | {sel} | {100 * r['selected_val_mean']:.2f} | {len(r['configurations'])} of "
                     f"{r['grid_size']} | {r['seconds']:.0f} |")
    for name, r in runs.items():
        if r.get("skipped"):
            continue
        seeds = [str(s) for s in r["seeds"]]
        lines += ["", f"## {name} (`{r['method']}`)", "",
                  "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for i, c in enumerate(r["configurations"]):
            mark = " **(selected)**" if i == r["selected_index"] else ""
            cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
            scores = " | ".join(f"{100 * c['val_scores'][s]:.2f}" for s in seeds)
            lines.append(f"| {cfg}{mark} | {scores} | {100 * c['val_mean']:.2f} |")
    return "\n".join(lines) + "\n"
