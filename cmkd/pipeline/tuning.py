"""The tuning protocol: every method's own hyper-parameters chosen on the validation split, from
a declared grid, with the same budget for every method and seeds apart from the reporting seeds.

params.yaml's `tuning` section:

    tuning:
      seeds: [100, 101, 102]     # tuning seeds; must not intersect the reporting `seeds`
      budget: 8                  # configurations trained per run (x tuning seeds x the run's epochs)
      subsample_seed: 0          # which configurations a grid larger than the budget keeps
      extension: {max_rounds: 4, max_extra_configs: 4, bounds: {...}, run_bounds: {...}}
      grids:
        student: {lr: [...]}     # STUDENT: keys of its training block (train.<dataset>.student)
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

Edge extension (`tuning.extension`): after the grid, while the best configuration's value on a
numeric axis is the smallest or largest value tried on that axis, one configuration is trained
per such axis: the best with that axis moved one step beyond the edge (`next_value`: geometric
on a log-spaced axis, arithmetic on a linear one, clipped to a closed bound), at most
`max_rounds` rounds and `max_extra_configs` configurations per run, the same for every run.
The run's evidence says whether its selection still sits on an edge (`on_edge`) and why the
axis stops there (`bound`: the declared bound's reason, or the extension budget spent), each
configuration's standard error over the tuning seeds (`val_se`), and whether the best beats the
second by less than the standard error of their paired difference (`within_noise`).

STUDENT (`tuning.grids.student`) is tuned the same way over its training's learning rate; its
selection is the training recipe of STUDENT and of every distill run (`tuned_train_params`), so
a KD row differs from STUDENT by its KD term only, and the KD runs are tuned at that recipe.

The selection is `tuned.yaml`: `<run>: {<dataset>: {param: value}}` (dotted keys), merged over
`runs.<run>` by the distill stages; a dataset absent under a run means "not tuned" (the run's
values from params.yaml, `selected_on: default`). Run-major, with every key of `runs` present,
so that the distill stages can list `tuned.yaml: [<run>]` as DVC params for any dataset.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cmkd.config import (
    STUDENT_TUNING,
    _deep_copy,
    apply_overrides,
    bound_for,
    budgeted_configs,
    expand_grid,
    is_number,
    within_bound,
)
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


def tuned_train_params(train_params: Mapping[str, Any], tuned: Mapping[str, Any],
                       dataset: str) -> tuple[dict[str, Any], str]:
    """`train.<dataset>.student` with STUDENT's selection (tuned.yaml's `student.<dataset>`) merged
    in, and where it came from ("val" or "default"): the training of STUDENT and of every distill
    run (the teacher's is never tuned)."""
    selection = (tuned.get(STUDENT_TUNING) or {}).get(dataset) or {}
    if not isinstance(selection, Mapping):
        raise ConfigError(f"{TUNED_FILE}: {STUDENT_TUNING}.{dataset}",
                          f"must be a mapping of training values, got {selection!r}")
    return {**_deep_copy(train_params), **selection}, ("val" if selection else "default")


def update_tuned(tuned: Mapping[str, Any], runs: Sequence[str], dataset: str,
                 selected: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """tuned.yaml's content after a selection on `dataset`: one key per entry of `runs` (params.yaml's
    `runs` and `student`; others dropped), `selected[run]` under `dataset` for the tuned runs, and `dataset`
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


def val_se(scores: Sequence[float]) -> float | None:
    """Standard error of a configuration's mean over the tuning seeds (None with one seed)."""
    if len(scores) < 2:
        return None
    return float(np.std(np.asarray(scores, dtype=float), ddof=1) / math.sqrt(len(scores)))


def noise(configs: Sequence[Mapping[str, Any]], best: int) -> dict[str, Any]:
    """How far the best is ahead of the second-best mean: `margin`, the standard error of the
    paired per-seed difference (the configurations share the tuning seeds) and `within_noise`
    (margin < that standard error; None where it is undefined: one configuration or one seed)."""
    means = [float(np.mean(list(c["val_scores"].values()))) for c in configs]
    others = [i for i in range(len(configs)) if i != best]
    if not others:
        return {"second_index": None, "margin": None, "margin_se": None, "within_noise": None}
    second = max(others, key=lambda i: (means[i], -i))
    seeds = sorted(set(configs[best]["val_scores"]) & set(configs[second]["val_scores"]))
    diff = [configs[best]["val_scores"][s] - configs[second]["val_scores"][s] for s in seeds]
    margin, se = means[best] - means[second], val_se(diff)
    return {"second_index": second, "margin": margin, "margin_se": se,
            "within_noise": None if se is None else bool(margin < se)}


def axis_spacing(values: Sequence[Any]) -> str | None:
    """"log" or "linear" for the numeric values of an axis (None: fewer than 2, nothing to step):
    log where every value is positive and consecutive ratios are at least as even as consecutive
    differences (2 positive values: log, as for the scale parameters tuned here)."""
    nums = sorted({float(v) for v in values if is_number(v)})
    if len(nums) < 2:
        return None
    if nums[0] <= 0:
        return "linear"
    diffs, ratios = np.diff(nums), np.diff(np.log(nums))
    return "log" if ratios.max() / ratios.min() <= diffs.max() / diffs.min() + 1e-9 else "linear"


def next_value(tried: Sequence[float], side: str, spacing: str, bound: Mapping[str, Any]) -> tuple[Any, str | None]:
    """One step beyond the `side` ("low"/"high") edge of the values `tried`, with the step of the
    edge's own interval; clipped to a closed bound (ge/le). Returns (value, None), or (None, why
    not) where the edge is already at the bound or an open bound (gt/lt) would be crossed."""
    nums = sorted({float(v) for v in tried})
    edge, inner = (nums[0], nums[1]) if side == "low" else (nums[-1], nums[-2])
    value = edge * edge / inner if spacing == "log" else 2 * edge - inner
    closed, open_ = ("ge", "gt") if side == "low" else ("le", "lt")
    reason = bound.get("reason", "")
    if closed in bound and (value < bound[closed] if side == "low" else value > bound[closed]):
        if edge == bound[closed]:
            return None, f"{'>=' if side == 'low' else '<='} {bound[closed]}: {reason}"
        value = float(bound[closed])
    if not within_bound(value, bound):
        return None, f"{'>' if side == 'low' else '<'} {bound[open_]}: {reason}"
    value = float(f"{value:.6g}")
    return (int(value) if all(isinstance(v, int) for v in tried) and value.is_integer() else value), None


def edges(configs: Sequence[Mapping[str, Any]], best: int, grid: Mapping[str, Sequence[Any]],
          bounds: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The numeric axes on which the best configuration's value is the smallest or largest value
    tried (declared or added by the extension): {axis: {side, value, next, bound}}, `next` the
    value one step beyond (None where `bound` says why the axis stops). Categorical axes, and a
    categorical value of a mixed axis (CTKD's null), have no edge."""
    out = {}
    for axis, declared in grid.items():
        spacing = axis_spacing(declared)
        value = configs[best]["config"][axis]
        if spacing is None or not is_number(value):
            continue
        tried = sorted({float(c["config"][axis]) for c in configs if is_number(c["config"][axis])}
                       | {float(v) for v in declared if is_number(v)})
        side = "low" if value == tried[0] else "high" if value == tried[-1] else None
        if side is None:
            continue
        ints = all(isinstance(v, int) for v in declared)
        step, why = next_value([int(v) if ints else v for v in tried], side, spacing, bounds.get(axis, {}))
        out[axis] = {"side": side, "value": value, "spacing": spacing, "next": step, "bound": why}
    return out


def extension_plan(configs: Sequence[Mapping[str, Any]], best: int, grid: Mapping[str, Sequence[Any]],
                   bounds: Mapping[str, Mapping[str, Any]], room: int) -> list[dict[str, Any]]:
    """The next round's configurations: the best with one edge axis stepped beyond its edge, one
    per axis that can still move (declared key order), at most `room`, none trained before."""
    trained = [c["config"] for c in configs]
    plan = []
    for axis, edge in edges(configs, best, grid, bounds).items():
        if edge["next"] is None or len(plan) >= room:
            continue
        cfg = {**configs[best]["config"], axis: edge["next"]}
        if cfg not in trained and cfg not in plan:
            plan.append(cfg)
    return plan


def run_bounds(tuning: Mapping[str, Any], run: str, grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {axis: bound_for(tuning, run, axis) for axis in grid}


def search(grid: Mapping[str, Sequence[Any]], configs: Sequence[Mapping[str, Any]], train, *,
           bounds: Mapping[str, Mapping[str, Any]], max_rounds: int, max_extra_configs: int) -> dict[str, Any]:
    """The grid's configurations, then the edge extension; `train(config) -> entry` with
    `val_scores` {seed: score}. Returns the entries, the selection and the edge/noise record."""
    entries = [train(cfg, "grid") for cfg in configs]
    rounds, stopped = [], "interior"
    for r in range(max_rounds + 1):
        best = select(entries)
        room = max_extra_configs - sum(len(x["configs"]) for x in rounds)
        plan = extension_plan(entries, best, grid, bounds, max(room, 0))
        if not edges(entries, best, grid, bounds):
            stopped = "interior"
            break
        if not plan:
            stopped = "bound" if room > 0 else "max_extra_configs"
            break
        if r == max_rounds:
            stopped = "max_rounds"
            break
        entries += [train(cfg, f"extension {r + 1}") for cfg in plan]
        rounds.append({"round": r + 1, "from": dict(entries[best]["config"]), "configs": plan})
    best = select(entries)
    on_edge = edges(entries, best, grid, bounds)
    spent = (f"extension budget spent (tuning.extension.{stopped} = "
             f"{max_rounds if stopped == 'max_rounds' else max_extra_configs})")
    bound = {axis: e["bound"] or spent for axis, e in on_edge.items()}
    for entry in entries:
        entry["val_mean"] = float(np.mean(list(entry["val_scores"].values())))
        entry["val_se"] = val_se(list(entry["val_scores"].values()))
    return {"configurations": entries, "selected_index": best, "selected": dict(entries[best]["config"]),
            "selected_val_mean": entries[best]["val_mean"], "on_edge": bool(on_edge), "bound": bound or None,
            "edges": on_edge, "extension": {"rounds": rounds, "stopped": stopped,
                                            "max_rounds": max_rounds, "max_extra_configs": max_extra_configs},
            "trainings": len(entries), **noise(entries, best)}


def tune_run(*, dataset: str, prepared: Path, run_name: str, run_cfg: Mapping[str, Any],
             grid: Mapping[str, Sequence[Any]], budget: int, subsample_seed: int, seeds: Sequence[int],
             models: Mapping[str, Any], train_cfg, teacher_dir: Path | None, teacher_train_cfg, work_dir: Path,
             tuning: Mapping[str, Any] | None = None, seed_workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Train every budgeted configuration of `grid` on the tuning `seeds`, extend edge optima by
    `tuning.extension` (none without it), and select on val.

    Reuses `cmkd.pipeline.train.train_run` (the engine, seed workers) with the test split never
    evaluated. `run_name` "student" tunes STUDENT: the grid's keys are then training keys set on
    `train_cfg`. Returns the run's evidence: every configuration's val score per seed, its mean
    and standard error, the chosen configuration, the edge record and the seconds spent."""
    import dataclasses

    from cmkd.data.h5 import read_attrs
    from cmkd.pipeline.train import skip_reason, train_run
    from cmkd.training.metrics import primary_metric

    ext = (tuning or {}).get("extension") or {}
    bounds = run_bounds(tuning or {}, run_name, grid)
    attrs = read_attrs(prepared)
    metric = primary_metric(attrs["task"])
    configs = budgeted_configs(grid, budget, subsample_seed, f"tuning.grids.{run_name}")
    head = {"dataset": dataset, "run": run_name, "method": run_cfg["method"], "metric": metric, "split": "val",
            "seeds": list(seeds), "budget": budget, "epochs": int(train_cfg.epochs),
            "grid": {k: list(v) for k, v in grid.items()}, "grid_size": len(expand_grid(grid)),
            "bounds": bounds, "train": {"lr": float(train_cfg.lr), "weight_decay": float(train_cfg.weight_decay)}}
    skipped = skip_reason(run_cfg["method"], dataset, prepared, attrs)
    if skipped:  # n/a here (AT on vector data): nothing to select, the row is skipped
        return {**head, "configurations": [], "selected_index": None, "selected": {}, "selected_val_mean": None,
                "on_edge": False, "bound": None, "within_noise": None, "trainings": 0,
                "extension": {"rounds": [], "stopped": None, "max_rounds": int(ext.get("max_rounds", 0)),
                              "max_extra_configs": int(ext.get("max_extra_configs", 0))},
                "skipped": skipped, "seconds": 0.0}
    _preload()
    start = time.perf_counter()
    student = run_name == STUDENT_TUNING

    counter = itertools.count()

    def train(overrides: Mapping[str, Any], stage: str) -> dict[str, Any]:
        i = next(counter)
        cfg, tcfg = run_cfg, train_cfg
        if student:
            tcfg = dataclasses.replace(train_cfg, **overrides)
            tcfg.validate(f"tuning.grids.{run_name}")
        else:
            cfg = apply_overrides(run_cfg, overrides)
        t0 = time.perf_counter()
        result = train_run(dataset=dataset, prepared=prepared, run_name=run_name, run_cfg=cfg, models=models,
                           train_cfg=tcfg, seeds=seeds, out_dir=work_dir / f"config{i}", checkpoint_root=None,
                           teacher_dir=None if student else teacher_dir, teacher_train_cfg=teacher_train_cfg,
                           progress=progress, seed_workers=seed_workers, evaluate_test=False, write_metrics=False)
        entry = {
            "config": dict(overrides), "stage": stage,
            "val_scores": {s: float(r["val"][metric]) for s, r in result["seeds"].items()},
            "best_epoch": {s: int(r["best_epoch"]) for s, r in result["seeds"].items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        extras = {s: r["method"] for s, r in result["seeds"].items() if "method" in r}
        if extras:
            entry["method"] = extras
        return entry

    found = search(grid, configs, train, bounds=bounds, max_rounds=int(ext.get("max_rounds", 0)),
                   max_extra_configs=int(ext.get("max_extra_configs", 0)))
    return {**head, **found, "seconds": round(time.perf_counter() - start, 2)}


def _preload() -> None:
    """Import, once in this process, what every training imports lazily (the optimisers'
    torch._dynamo, DVCLive, torchmetrics: ~5 s of CPU). train_run forks seed workers per
    configuration; without this each of them would import it again."""
    import importlib

    for name in ("torch._dynamo", "dvclive", "torchmetrics"):
        importlib.import_module(name)


# ---------------------------------------------------------------------------- evidence report


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def report_markdown(dataset: str, runs: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> str:
    """The evidence as Markdown: per run, every configuration's val score per tuning seed, its
    standard error, and whether the selection sits on an edge (and why) or within noise."""
    lines = [f"# Tuning on `{dataset}` (validation split, mean over tuning seeds)", ""]
    if extra:
        for k, v in extra.items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lines += ["| run | selected | val × 100 | ± SE | best − second | within noise | on edge (why it stops) "
              "| configurations | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if r.get("skipped"):
            lines.append(f"| {name} | n/a ({r['skipped']}) | | | | | | | |")
            continue
        sel = ", ".join(f"{k}={v}" for k, v in r["selected"].items())
        best = r["configurations"][r["selected_index"]]
        edge = "no" if not r.get("on_edge") else "; ".join(f"{k}: {v}" for k, v in (r.get("bound") or {}).items())
        noisy = {True: "yes", False: "no", None: ""}[r.get("within_noise")]
        lines.append(f"| {name} | {sel} | {100 * r['selected_val_mean']:.2f} | {_fmt(best.get('val_se'))} | "
                     f"{_fmt(r.get('margin'))} | {noisy} | {edge} | {len(r['configurations'])} ({r['grid_size']} in "
                     f"the grid) | {r['seconds']:.0f} |")
    for name, r in runs.items():
        if r.get("skipped"):
            continue
        seeds = [str(s) for s in r["seeds"]]
        lines += ["", f"## {name} (`{r['method']}`)", "",
                  "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | SE |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for i, c in enumerate(r["configurations"]):
            mark = " **(selected)**" if i == r["selected_index"] else ""
            ext = f" ({c['stage']})" if c.get("stage", "grid") != "grid" else ""
            cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
            scores = " | ".join(f"{100 * c['val_scores'][s]:.2f}" for s in seeds)
            lines.append(f"| {cfg}{ext}{mark} | {scores} | {100 * c['val_mean']:.2f} | {_fmt(c.get('val_se'))} |")
    return "\n".join(lines) + "\n"
