"""Which source files a training stage's code consists of, found without importing anything.

DVC can only declare dependencies statically, and a `distill@<dataset>-<run>` stage needs the
files of *its* method: the module that registers the run's `method`, the method a wrapper wraps
(`ntdh_mask` with `base: {method: kd}`), and every cmkd module those import (`mgkd` imports
DisCoM-KD's `reinitialised_copy`), beside the stage script and the training code it imports.
The stage `method_code` writes, per run, the content hash of each such file
(`data/method_code/<run>.json`; `stages/{teacher,student,experiments}.json` for the stages that
are not runs); each training stage depends on its one file, so a new or edited method module
reruns only the runs whose code it is (docs/extending.md). One file instead of a dozen source
deps a stage also keeps dvc.lock short, which DVC parses and rewrites after every stage.

Imports are read from the source with `ast` (also those inside functions, so the set is a
superset of what a run imports at any point), and the registries' lookups by name from their
decorators (cmkd/utils/registry.py); a test compares it with `sys.modules` after a real import.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cmkd.utils.registry import registered_names

PACKAGE = "cmkd"
# The registries' decorators (cmkd.methods.register, cmkd.models.register_arch), as their modules
# use them: read from the source here, so that this module imports neither torch nor the methods.
METHODS_DECORATOR = "register"
# A run's networks are chosen by `models.<dataset>.<role>`, per dataset, while a run's code file
# is shared by every dataset: every architecture module is part of the training code.
WHOLE_REGISTRIES = ("cmkd.models",)
# Every stage script runs through these (`python -m stages <name>`).
STAGE_COMMON = ("stages/__init__.py", "stages/__main__.py", "stages/_common.py")


def module_path(root: Path, module: str) -> Path | None:
    """cmkd.a.b -> root/cmkd/a/b.py or root/cmkd/a/b/__init__.py; None when neither exists."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(root: Path, module: str, path: Path | None = None) -> set[str]:
    """The cmkd modules `module`'s source imports (any depth in the file), parents included.
    `path`: read this file as `module` (a stage script, which is not under cmkd/)."""
    path = path or module_path(root, module)
    if path is None:
        return set()
    names = _imported_names(module, path.name == "__init__.py", path.read_text(), str(path))
    found: set[str] = set()
    for name in names:
        if name.split(".")[0] == PACKAGE and module_path(root, name) is not None:
            found.add(name)
            found.update(_parents(name))
    return found


@functools.lru_cache(maxsize=1024)
def _imported_names(module: str, is_package: bool, source: str, filename: str) -> tuple[str, ...]:
    # Keyed by the source text itself: a file parses once per process however many runs share it.
    tree = ast.parse(source, filename=filename)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from cmkd.methods import discom` imports a submodule; `import register` a name
            found.extend([base] + [f"{base}.{alias.name}" for alias in node.names])
    return tuple(found)


def closure(root: Path, modules: Iterable[str]) -> set[str]:
    """`modules`, their parent packages and everything they import, transitively."""
    todo = list(modules)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or module_path(root, name) is None:
            continue
        seen.add(name)
        todo.extend(_parents(name))
        todo.extend(imported_modules(root, name))
        if name in WHOLE_REGISTRIES:  # looked up by name at run time: no import statement names them
            todo.extend(sorted(registry_modules(root, name)))
    return seen


def registered_methods(root: Path, package: str = "cmkd.methods") -> dict[str, str]:
    """Method name -> module that registers it, read from `@register("name")` decorators (the
    methods registry's own index, cmkd/utils/registry.py, read in the checkout at `root`)."""
    return registered_names(root.joinpath(*package.split(".")), package, METHODS_DECORATOR)


def registry_modules(root: Path, package: str) -> set[str]:
    """Every module of a registry's package (files starting with `_` are not registry modules)."""
    folder = root.joinpath(*package.split("."))
    return {f"{package}.{p.stem}" for p in folder.glob("*.py") if not p.name.startswith("_")}


def methods_of_run(run_cfg: Any) -> list[str]:
    """Every `method:` value in a run's entry, nested ones (a wrapper's `base`) included."""
    found: list[str] = []
    if isinstance(run_cfg, Mapping):
        if isinstance(run_cfg.get("method"), str):
            found.append(run_cfg["method"])
        for value in run_cfg.values():
            found.extend(m for m in methods_of_run(value) if m not in found)
    elif isinstance(run_cfg, list):
        for value in run_cfg:
            found.extend(m for m in methods_of_run(value) if m not in found)
    return found


def run_modules(root: Path, run_cfg: Mapping[str, Any]) -> set[str]:
    """The cmkd modules a run's methods consist of (unknown method names contribute nothing:
    the up-front check reports them)."""
    registry = registered_methods(root)
    return closure(root, [registry[m] for m in methods_of_run(run_cfg) if m in registry])


def _hashes(root: Path, paths: Iterable[Path]) -> dict[str, str]:
    files = {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    return dict(sorted(files.items()))


def run_code(root: Path, run_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Relative path -> sha256 of every file of a run's method code, sorted by path."""
    return _hashes(root, (module_path(root, m) for m in run_modules(root, run_cfg)))


def stage_code(root: Path, script: str, methods_cfg: Any = None) -> dict[str, str]:
    """Relative path -> sha256 of every file a stage runs: its script (`stages/train.py`), the
    shared stage entry files, the cmkd modules they import (transitively), and the code of every
    method named in `methods_cfg` (a run's entry, or any params holding `method:` keys).

    Not included: the modules the up-front check of the whole params file imports for *other*
    runs and datasets (every stage validates all of params.yaml before it works). They can stop
    a stage with a configuration error but never change what it writes, and listing them would
    rerun every run when one method module changes."""
    scripts = [root / script] + [root / f for f in STAGE_COMMON]
    modules: set[str] = set()
    for path in scripts:
        modules |= imported_modules(root, "stages." + path.stem, path=path)
    modules = closure(root, modules) | (run_modules(root, methods_cfg) if methods_cfg is not None else set())
    return _hashes(root, scripts + [module_path(root, m) for m in modules])
