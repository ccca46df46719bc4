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
"""

from __future__ import annotations

import sys
from types import ModuleType

from cmkd.utils.registry import Registry

#: A dataset is the module whose `prepare` carries `@register_dataset("name", ...)`, in
#: cmkd/data/datasets/ (the readers) or cmkd/data/samples/ (the offline samples).
DATASETS = Registry("dataset", ["cmkd.data.datasets", "cmkd.data.samples"], decorator="register_dataset")
register_dataset = DATASETS.register


def available_datasets() -> list[str]:
    """The dataset names `datasets` in params.yaml may list (read from the source)."""
    return DATASETS.names()


def dataset_module(name: str, key: str = "datasets") -> ModuleType:
    """The module of dataset `name` (imports only that module)."""
    return sys.modules[DATASETS.lookup(name, key).__module__]


def is_smoke_test(name: str, cfg) -> bool:
    """Whether dataset `name` with settings `cfg` is a generated sample (a smoke test)."""
    check = getattr(dataset_module(name), "is_smoke_test", None)
    return bool(check(cfg)) if check is not None else False
