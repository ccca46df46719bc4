"""params.yaml: loading and validation. Every problem is a ConfigError naming the key, raised
before any stage does work."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

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

    from cmkd.engine import TrainConfig
    from cmkd.methods import get_method
    from cmkd.models import available_archs

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

    from cmkd.tuning import validate_tuning

    validate_tuning(params)  # grids, budget, tuning seeds disjoint from `seeds`

    from cmkd.data.paired import is_paired
    from cmkd.resolve import resolve_roles

    archs = set(available_archs())
    for ds in datasets:
        paired = is_paired(params["data"][ds])
        # a paired dataset's blocks are optional overrides of defaults chosen from its input
        # shapes, known once its files are read (cmkd.resolve): its keys are checked over a default
        roles = resolve_roles(params, ds, ("classification", (1,), (1,)) if paired else None)
        for role in ("teacher", "student"):
            model = roles[role]["model"]
            if model.get("arch") not in archs:
                raise ConfigError(f"models.{ds}.{role}.arch", f"unknown architecture {model.get('arch')!r}; known: {sorted(archs)}")
            TrainConfig.from_params(roles[role]["train"], f"train.{ds}.{role}")
