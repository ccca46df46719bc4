"""Dataset registry: name -> module implementing the dataset's stages (cmkd/utils/registry.py).

Each module provides
    download(cfg: dict, raw_dir: Path, progress: bool = True) -> None
        fill `raw_dir` (the stage renames it into place, so a failure leaves nothing);
    prepare(cfg: dict, raw_dir: Path, out_path: Path, progress: bool = True) -> None
        write the prepared HDF5 file (cmkd.data.h5.PreparedWriter);
and optionally validate(cfg: dict, key: str) -> None, raising ConfigError, and
    is_smoke_test(cfg: dict) -> bool: True for an offline sample that only exercises the code
    path (its reports then say it is a smoke test, not a result).
`cfg` is the dataset's `data.<name>` entry of params.yaml.

A name that is not registered may still be a dataset of a registered *kind*: `kind: paired`
in its `data.<name>` entry is a user's own paired data, read by cmkd.data.datasets.paired (no code).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Mapping

from cmkd.errors import ConfigError
from cmkd.utils.registry import Registry

#: A dataset is the module whose `prepare` carries `@register_dataset("name", ...)`, in
#: cmkd/data/datasets/ (the readers) or cmkd/data/samples/ (the offline samples).
DATASETS = Registry("dataset", ["cmkd.data.datasets", "cmkd.data.samples"], decorator="register_dataset")
register_dataset = DATASETS.register


# Dataset kinds: params.yaml's `data.<name>.kind` -> the module that reads such data.
KINDS: dict[str, str] = {"paired": "cmkd.data.datasets.paired"}


def available_datasets() -> list[str]:
    """The dataset names `datasets` in params.yaml may list (read from the source)."""
    return DATASETS.names()


def dataset_kind(cfg: Any) -> str | None:
    """The `kind` of a `data.<name>` entry (None: a registered dataset)."""
    return cfg.get("kind") if isinstance(cfg, Mapping) else None


def dataset_module(name: str, key: str = "datasets", cfg: Any = None) -> ModuleType:
    """The module of dataset `name` (imports only that module); `cfg`, its `data.<name>` entry,
    decides for a user's dataset of a `kind`."""
    kind = dataset_kind(cfg)
    if kind is not None:
        if kind not in KINDS:
            raise ConfigError(f"data.{name}.kind", f"unknown kind {kind!r}; known: {sorted(KINDS)}")
        if name in DATASETS.names():
            raise ConfigError(f"data.{name}.kind", f"{name!r} is a built-in dataset; give your data another name")
        return importlib.import_module(KINDS[kind])
    if name not in DATASETS.names():
        raise ConfigError(key, f"unknown dataset {name!r}; known: {DATASETS.names()}, or a `data.{name}` entry "
                               f"with `kind: paired` (docs/own-data.md)")
    return sys.modules[DATASETS.lookup(name, key).__module__]


def is_smoke_test(name: str, cfg) -> bool:
    """Whether dataset `name` with settings `cfg` is a generated sample (a smoke test)."""
    check = getattr(dataset_module(name, cfg=cfg), "is_smoke_test", None)
    return bool(check(cfg)) if check is not None else False
