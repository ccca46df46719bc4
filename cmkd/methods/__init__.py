"""The method registry: one module per method, each registering a `Distiller` subclass.

A distiller's `forward(batch)` returns a dict of named, already-weighted loss terms (the
engine sums them and logs each), so adding a method never touches the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from cmkd.errors import ConfigError
from cmkd.methods.base import Distiller

_REGISTRY: dict[str, type[Distiller]] = {}

# Modules that register methods when imported; imported lazily on the first lookup.
_METHOD_MODULES = (
    "cmkd.methods.supervised",
    "cmkd.methods.kd",
    "cmkd.methods.dkd",
    "cmkd.methods.ctkd",
    "cmkd.methods.mlkd",
    "cmkd.methods.ntdh",
    "cmkd.methods.c2kd",
    "cmkd.methods.discom",
    "cmkd.methods.mfh",
    "cmkd.methods.fitnet",
    "cmkd.methods.at",
    "cmkd.methods.rkd",
    "cmkd.methods.crd",
)


def register(name: str):
    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def available_methods() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_method(name: str, key: str = "runs") -> type[Distiller]:
    _load()
    if name not in _REGISTRY:
        raise ConfigError(key, f"unknown method {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_distiller(run_cfg: Mapping[str, Any], student, teacher, num_classes: int, key: str = "runs") -> Distiller:
    """Instantiate the distiller a `runs.<name>` entry describes."""
    cfg = dict(run_cfg)
    cls = get_method(cfg.pop("method", None), f"{key}.method")
    cls.validate(cfg, key)
    return cls(student=student, teacher=teacher, cfg=cfg, num_classes=num_classes)


__all__ = ["Distiller", "register", "available_methods", "get_method", "build_distiller"]
