"""The method registry: one module per method, each registering a `Distiller` subclass.

A method is registered with `@register("name")` (cmkd/utils/registry.py, the pattern of models
and datasets too): a lookup imports only the module whose decorator names the method (read from
the source), and `available_methods()` imports every module of the package. A new method is one new file and
nothing to edit here (docs/extending.md). Importing only what a run uses keeps what it runs
equal to what its DVC stage depends on (stage `method_code`).

A distiller's `forward(batch)` returns a dict of named, already-weighted loss terms (the
engine sums them and logs each), so adding a method never touches the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmkd.methods.base import Distiller
from cmkd.utils.registry import Registry

METHODS = Registry("method", ["cmkd.methods"], decorator="register")


def register(name: str):
    """Decorator: register a Distiller subclass as method `name` (sets its `method_name`)."""
    add = METHODS.register(name)

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        cls.method_name = name
        return add(cls)

    return wrap


def method_modules() -> list[str]:
    """Every module of this package (found, not imported); importing them registers the methods."""
    return METHODS.modules()


def available_methods() -> list[str]:
    """Every registered method (imports every method module)."""
    return sorted(METHODS.load_all())


def get_method(name: str, key: str = "runs") -> type[Distiller]:
    """The Distiller class of method `name`, importing only the module that registers it."""
    return METHODS.lookup(name, key)


def build_distiller(run_cfg: Mapping[str, Any], student, teacher, num_classes: int, key: str = "runs") -> Distiller:
    """Instantiate the distiller a `runs.<name>` entry describes."""
    cfg = dict(run_cfg)
    cls = get_method(cfg.pop("method", None), f"{key}.method")
    cls.validate(cfg, key)
    return cls(student=student, teacher=teacher, cfg=cfg, num_classes=num_classes)


__all__ = ["Distiller", "METHODS", "register", "available_methods", "method_modules",
           "get_method", "build_distiller"]
