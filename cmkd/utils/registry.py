"""One registration pattern for methods, models and datasets.

A `Registry` maps names to the objects registered under them, each with the registry's
decorator where it is defined: `@register("kd")` on a Distiller class (cmkd.methods),
`@register_arch("mlp")` on a model builder (cmkd.models), `@register_dataset("synthetic")` on a
dataset module's `prepare` (cmkd.data.registry). Which module registers which name is read from
the source with `ast`, without importing anything (`registered_names`), so that

- a lookup imports only the module that registers the name: a run imports only its own
  method's code, the code its DVC stage depends on (cmkd/pipeline/codedeps.py reads the same
  index to hash that code), and a model or dataset lookup does not import every other one;
- the known names are listed without importing torch (the params checks of `download` and
  `prepare`, error messages).

A new method, model or dataset is one new file in the registry's package, nothing to edit here.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cmkd.errors import ConfigError


def registered_names(folder: Path, package: str, decorator: str) -> dict[str, str]:
    """Name -> module (`package.<file>`) for every `@<decorator>("name", ...)` on a class or
    function of the modules in `folder` (files starting with `_` are not modules of a registry)."""
    out: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.py")):
        if path.name.startswith("_"):
            continue
        for name in _decorated_names(path.read_text(), str(path), decorator):
            out[name] = f"{package}.{path.stem}"
    return out


@functools.lru_cache(maxsize=256)
def _decorated_names(source: str, filename: str, decorator: str) -> tuple[str, ...]:
    # Keyed by the source text itself: a file parses once per process however often it is asked.
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not isinstance(dec, ast.Call):
                continue
            called = dec.func.id if isinstance(dec.func, ast.Name) else getattr(dec.func, "attr", None)
            if called == decorator:
                found.extend(a.value for a in dec.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return tuple(found)


def package_folder(package: str) -> Path:
    """The folder of an importable package (its parents are imported; the package is not)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not a package")
    return Path(list(spec.submodule_search_locations)[0])


class Registry(Mapping):
    """Objects of one kind by name, registered with `register(name, ...)` as a decorator in the
    modules of `packages`; `lookup` imports the registering module on first use. As a mapping
    (read-only) it is the source index: name -> module that registers it.

    kind: what a name names, for messages ("method", "architecture", "dataset").
    decorator: the name the packages' modules use for `register` (the source index looks for it).
    """

    def __init__(self, kind: str, packages: Sequence[str], decorator: str):
        self.kind = kind
        self.packages = tuple(packages)
        self.decorator = decorator
        self._entries: dict[str, Any] = {}

    def register(self, *names: str) -> Callable[[Any], Any]:
        """Decorator: register the class or function under every name in `names`."""
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {names!r}")

        def wrap(obj: Any) -> Any:
            for name in names:
                if name in self._entries and self._entries[name] is not obj:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._entries[name] = obj
            return obj

        return wrap

    def index(self) -> dict[str, str]:
        """Name -> module that registers it, from the source (nothing imported)."""
        out: dict[str, str] = {}
        for package in self.packages:
            out.update(registered_names(package_folder(package), package, self.decorator))
        return out

    def names(self) -> list[str]:
        """Every known name: found in the source, or registered at run time."""
        return sorted(set(self.index()) | set(self._entries))

    def modules(self) -> list[str]:
        """Every module of the registry's packages (found, not imported)."""
        found = []
        for package in self.packages:
            found += [f"{package}.{p.stem}" for p in sorted(package_folder(package).glob("*.py"))
                      if not p.name.startswith("_")]
        return sorted(found)

    def load_all(self) -> dict[str, Any]:
        """Import every module of the packages; name -> object of everything registered."""
        for module in self.modules():
            importlib.import_module(module)
        return dict(self._entries)

    def __getitem__(self, name: str) -> str:
        index = self.index()
        if name in index:
            return index[name]
        if name in self._entries:
            return self._entries[name].__module__
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self.index()

    def lookup(self, name: Any, key: str) -> Any:
        """The object registered as `name`; a ConfigError naming the params `key` and the known
        names when there is none."""
        if isinstance(name, str) and name not in self._entries:
            module = self.index().get(name)
            if module is not None:
                importlib.import_module(module)
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(key, f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._entries[name]
