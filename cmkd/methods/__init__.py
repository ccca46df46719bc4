"""The method registry: one module per method, each registering a `Distiller` subclass.

Every module of this package is found without an index: a lookup imports only the module whose
`@register("name")` names the method (read from the source, cmkd/pipeline/codedeps.py), and
`available_methods()` imports every module `pkgutil` finds. A new method is one new file and
nothing to edit here (docs/extending.md). Importing only what a run uses keeps what it runs
equal to what its DVC stage depends on (stage `method_code`).

A distiller's `forward(batch)` returns a dict of named, already-weighted loss terms (the
engine sums them and logs each), so adding a method never touches the training loop.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from cmkd.errors import ConfigError
from cmkd.methods.base import Distiller

_REGISTRY: dict[str, type[Distiller]] = {}


def register(name: str):
    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_modules() -> list[str]:
    """Every module of this package (found, not imported); importing them registers the methods."""
    return sorted(f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)
                  if not info.name.startswith("_"))


def _load() -> None:
    for module in method_modules():
        importlib.import_module(module)


def available_methods() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def _load_for(name: str) -> None:
    from pathlib import Path

    from cmkd.pipeline.codedeps import registered_methods

    module = registered_methods(Path(__file__).resolve().parents[2], __name__).get(name)
    if module is not None:
        importlib.import_module(module)
    if name not in _REGISTRY:  # registered some other way than the decorator: import them all
        _load()


def get_method(name: str, key: str = "runs") -> type[Distiller]:
    if not isinstance(name, str):
        raise ConfigError(key, f"must be a method name, got {name!r}")
    if name not in _REGISTRY:
        _load_for(name)
    if name not in _REGISTRY:
        raise ConfigError(key, f"unknown method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_distiller(run_cfg: Mapping[str, Any], student, teacher, num_classes: int, key: str = "runs") -> Distiller:
    """Instantiate the distiller a `runs.<name>` entry describes."""
    cfg = dict(run_cfg)
    cls = get_method(cfg.pop("method", None), f"{key}.method")
    cls.validate(cfg, key)
    return cls(student=student, teacher=teacher, cfg=cfg, num_classes=num_classes)


__all__ = ["Distiller", "register", "available_methods", "method_modules", "get_method", "build_distiller"]
