"""params.yaml: loading and validation. Every problem is a ConfigError naming the key, raised
before any stage does work. Each section is checked by the layer that reads it (datasets, models,
methods, training); the tuning grids here, so that checking params never imports the pipeline."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cmkd.errors import ConfigError

# The two baselines every table has, which are not keys of `runs`: the teacher-modality network
# and the no-KD student (the registered methods `teacher` and `supervised`).
TEACHER_RUN = {"method": "teacher"}
STUDENT_RUN = {"method": "supervised"}


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError("params.yaml", f"file {path} not found") from err
    except yaml.YAMLError as err:
        raise ConfigError("params.yaml", f"{path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise ConfigError("params.yaml", f"{path} must be a mapping")
    return params


def _require(params: Mapping[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(key, "missing")
        node = node[part]
    return node


def validate_params(params: Mapping[str, Any], data_only: bool = False) -> None:
    """Check the whole file: datasets, seeds, runs and their methods, data, models, training.
    `data_only`: datasets, seeds and data only (what download and prepare read), without
    importing torch, which the methods, models and training checks need."""
    from cmkd.data.registry import dataset_module

    datasets = _require(params, "datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError("datasets", "must be a non-empty list of dataset names")
    seeds = _require(params, "seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError("seeds", f"must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"has duplicates: {seeds}")

    for ds in datasets:
        module = dataset_module(ds, "datasets", (params.get("data") or {}).get(ds))
        data_cfg = _require(params, f"data.{ds}")
        if hasattr(module, "validate"):
            module.validate(data_cfg, f"data.{ds}")
    if data_only:
        return

    from cmkd.methods import get_method
    from cmkd.models import available_archs
    from cmkd.training.config import TrainConfig

    runs = _require(params, "runs")
    methods = _require(params, "methods")
    if not isinstance(methods, list):
        raise ConfigError("methods", "must be a list of run names (keys of `runs`)")
    for name in methods:
        if name not in runs:
            raise ConfigError("methods", f"unknown method {name!r}: not a key of `runs` (known: {sorted(runs)})")
    for name, run in runs.items():
        if not isinstance(run, Mapping) or "method" not in run:
            raise ConfigError(f"runs.{name}.method", "missing")
        cfg = dict(run)
        cls = get_method(cfg.pop("method"), f"runs.{name}.method")
        cls.validate(cfg, f"runs.{name}")

    validate_tuning(params)  # grids, budget, tuning seeds disjoint from `seeds`

    from cmkd.data.datasets.paired import is_paired
    from cmkd.training.resolve import resolve_roles

    archs = set(available_archs())
    for ds in datasets:
        paired = is_paired(params["data"][ds])
        # a paired dataset's blocks are optional overrides of defaults chosen from its input
        # shapes, known once its files are read (cmkd/training/resolve.py): its keys are checked over a default
        roles = resolve_roles(params, ds, ("classification", (1,), (1,)) if paired else None)
        for role in ("teacher", "student"):
            model = roles[role]["model"]
            if model.get("arch") not in archs:
                raise ConfigError(f"models.{ds}.{role}.arch",
                                  f"unknown architecture {model.get('arch')!r}; known: {sorted(archs)}")
            TrainConfig.from_params(roles[role]["train"], f"train.{ds}.{role}")


# ---------------------------------------------------------------------------- tuning grids
# The tuning protocol's configuration (`tuning` in params.yaml; the protocol itself is
# cmkd/pipeline/tuning.py): checked with the rest of the file, without importing the pipeline.


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every configuration of a grid: the Cartesian product in declared key order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def budgeted_configs(grid: Mapping[str, Sequence[Any]], budget: int, subsample_seed: int = 0,
                     key: str = "tuning.grids") -> list[dict[str, Any]]:
    """Exactly `budget` configurations of `grid` (see cmkd/pipeline/tuning.py's docstring)."""
    configs = expand_grid(grid)
    if len(configs) < budget:
        raise ConfigError(key, f"has {len(configs)} configurations, fewer than tuning.budget = {budget}: declare more "
                               "values")
    if len(configs) == budget:
        return configs
    keep = np.sort(np.random.default_rng([int(subsample_seed), len(configs)]).permutation(len(configs))[:budget])
    return [configs[i] for i in keep]


def apply_overrides(run_cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """run_cfg with `overrides` set; a dotted key (`base.temperature`) sets a nested entry.
    Nothing is modified in place."""
    out = _deep_copy(run_cfg)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"{part!r} is not a mapping in the run's configuration")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_deep_copy(v) for v in obj]
    return obj


# STUDENT's entry in tuning.grids: keys of its training block (train.<dataset>.student), not of a run.
STUDENT_TUNING = "student"
STUDENT_TUNABLE = ("lr", "weight_decay")
_BOUND_KEYS = ("ge", "gt", "le", "lt")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def bound_for(tuning: Mapping[str, Any], run: str, key: str) -> dict[str, Any]:
    """The declared range of a tuned parameter (tuning.extension): `run_bounds.<run>.<key>` if
    declared, else `bounds.<name>` with name the key's last dotted part; {} if neither."""
    ext = tuning.get("extension") or {}
    by_run = (ext.get("run_bounds") or {}).get(run) or {}
    if key in by_run:
        return dict(by_run[key])
    return dict((ext.get("bounds") or {}).get(key.rsplit(".", 1)[-1]) or {})


def within_bound(value: float, bound: Mapping[str, Any]) -> bool:
    return not (("ge" in bound and value < bound["ge"]) or ("gt" in bound and value <= bound["gt"])
                or ("le" in bound and value > bound["le"]) or ("lt" in bound and value >= bound["lt"]))


def _validate_extension(tuning: Mapping[str, Any]) -> None:
    ext = tuning.get("extension")
    if not isinstance(ext, Mapping):
        raise ConfigError("tuning.extension",
                          "missing: declare the edge-extension rule (max_rounds, max_extra_configs, bounds)")
    for key in ("max_rounds", "max_extra_configs"):
        value = ext.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"tuning.extension.{key}", f"must be a non-negative integer, got {value!r}")
    tables = [("bounds", ext.get("bounds") or {})]
    run_bounds = ext.get("run_bounds") or {}
    if not isinstance(run_bounds, Mapping):
        raise ConfigError("tuning.extension.run_bounds", "must map runs to {parameter: bound}")
    tables += [(f"run_bounds.{run}", table) for run, table in run_bounds.items()]
    for where, table in tables:
        if not isinstance(table, Mapping):
            raise ConfigError(f"tuning.extension.{where}", "must map parameter names to bounds")
        for name, bound in table.items():
            bkey = f"tuning.extension.{where}.{name}"
            if not isinstance(bound, Mapping) or not set(bound) <= {*_BOUND_KEYS, "reason"}:
                raise ConfigError(bkey, f"must be a mapping of {_BOUND_KEYS} and reason, got {bound!r}")
            if not isinstance(bound.get("reason"), str) or not bound["reason"].strip():
                raise ConfigError(f"{bkey}.reason",
                                  "missing: say why the range stops there (the method's paper or code)")
            if ("ge" in bound and "gt" in bound) or ("le" in bound and "lt" in bound):
                raise ConfigError(bkey, "declare one lower (ge or gt) and one upper (le or lt) limit at most")
            for k in _BOUND_KEYS:
                if k in bound and not is_number(bound[k]):
                    raise ConfigError(f"{bkey}.{k}", f"must be a number, got {bound[k]!r}")


def validate_tuning(params: Mapping[str, Any]) -> None:
    """Check params.yaml's `tuning` section (absent: nothing to check)."""
    from cmkd.methods import get_method

    tuning = params.get("tuning")
    if tuning is None:
        return
    if not isinstance(tuning, Mapping):
        raise ConfigError("tuning", "must be a mapping with seeds, budget and grids")
    seeds = tuning.get("seeds")
    if not isinstance(seeds, list) or len(seeds) < 1 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError("tuning.seeds", f"must be a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("tuning.seeds", f"has duplicates: {seeds}")
    shared = sorted(set(seeds) & set(params.get("seeds") or []))
    if shared:
        raise ConfigError("tuning.seeds", f"must be disjoint from the reporting seeds; both hold {shared}")
    budget = tuning.get("budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError("tuning.budget", f"must be a positive integer, got {budget!r}")
    if not isinstance(tuning.get("subsample_seed", 0), int):
        raise ConfigError("tuning.subsample_seed", f"must be an integer, got {tuning.get('subsample_seed')!r}")
    _validate_extension(tuning)
    grids = tuning.get("grids")
    if not isinstance(grids, Mapping):
        raise ConfigError("tuning.grids", "must map run names to grids")
    runs = params.get("runs") or {}
    if STUDENT_TUNING in runs:
        raise ConfigError(f"runs.{STUDENT_TUNING}",
                          "is reserved for the STUDENT baseline's tuning (tuning.grids.student)")
    for name in [STUDENT_TUNING, *(params.get("methods") or [])]:
        if name not in grids:
            raise ConfigError(f"tuning.grids.{name}",
                              "missing: every run of `methods` and STUDENT need a grid (the same budget for every "
                              "method)")
    for name, grid in grids.items():
        gkey = f"tuning.grids.{name}"
        if name not in runs and name != STUDENT_TUNING:
            raise ConfigError(gkey, f"not a key of `runs` (known: {sorted(runs)}) nor {STUDENT_TUNING!r}")
        if not isinstance(grid, Mapping) or not grid:
            raise ConfigError(gkey, "must map parameter names to non-empty lists of values")
        for pkey, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{gkey}.{pkey}", f"must be a non-empty list of values, got {values!r}")
            bound = bound_for(tuning, name, pkey)
            outside = [v for v in values if is_number(v) and not within_bound(v, bound)]
            if outside:
                raise ConfigError(f"{gkey}.{pkey}", f"values {outside} lie outside the declared bound {bound}")
        configs = budgeted_configs(grid, budget, int(tuning.get("subsample_seed", 0)), gkey)
        if name == STUDENT_TUNING:
            bad = sorted(set(grid) - set(STUDENT_TUNABLE))
            if bad:
                raise ConfigError(f"{gkey}.{bad[0]}", f"STUDENT is tuned over its training's {STUDENT_TUNABLE} only")
            for pkey, values in grid.items():
                if not all(is_number(v) and v >= 0 for v in values) or (pkey == "lr" and min(values) <= 0):
                    raise ConfigError(f"{gkey}.{pkey}", f"must be numbers (lr > 0, weight_decay >= 0), got {values!r}")
            continue
        for cfg in configs:  # every configuration must be a valid run
            try:
                merged = apply_overrides(runs[name], cfg)
            except ConfigError as err:
                raise ConfigError(f"{gkey}.{err.key}", err.problem) from None
            merged = dict(merged)
            get_method(merged.pop("method"), f"runs.{name}.method").validate(merged, f"{gkey} (configuration {cfg})")
