"""Which source files a distillation run's code consists of, found without importing anything.

DVC can only declare dependencies statically, and a `distill@<dataset>-<run>` stage needs the
files of *its* method: the module that registers the run's `method`, the method a wrapper wraps
(`ntdh_mask` with `base: {method: kd}`), and every cmkd module those import (`mgkd` imports
DisCoM-KD's `reinitialised_copy`). The stage `method_code` writes, per run, the content hash of
each such file (`data/method_code/<run>.json`); the distill stage depends on that file, so a
new or edited method module reruns only the runs whose code it is (docs/extending.md).

Imports are read from the source with `ast` (also those inside functions, so the set is a
superset of what a run imports at any point); a test compares it with `sys.modules` after a
real import.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

PACKAGE = "cmkd"


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


def imported_modules(root: Path, module: str) -> set[str]:
    """The cmkd modules `module`'s source imports (any depth in the file), parents included."""
    path = module_path(root, module)
    if path is None:
        return set()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from cmkd.methods import discom` imports a submodule; `import register` a name
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and module_path(root, name) is not None:
                found.add(name)
                found.update(_parents(name))
    return found


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
    return seen


def registered_methods(root: Path, package: str = "cmkd.methods") -> dict[str, str]:
    """Method name -> module that registers it, read from `@register("name")` decorators."""
    folder = root.joinpath(*package.split("."))
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "register"
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    out[dec.args[0].value] = f"{package}.{path.stem}"
    return out


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


def run_code(root: Path, run_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Relative path -> sha256 of every file of a run's code, sorted by path."""
    files = {}
    for module in run_modules(root, run_cfg):
        path = module_path(root, module)
        files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(files.items()))
