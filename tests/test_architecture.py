"""The package tree is the architecture: cmkd's modules form layers, and no import goes up a layer
or round a cycle. Imports are read from the source with `ast`, at any depth: a function-local
import counts as much as a module-level one (one that hides a cycle is a cycle). Imports under
`if TYPE_CHECKING:` never run and are not counted. Importing a module also imports its parent
packages, so an import of `cmkd.a.b` is an edge to `cmkd.a.b`, `cmkd.a` and `cmkd`.

The layers, lowest first (a module may import its own layer and those below):

 0. cmkd, cmkd.errors, cmkd.utils        atomic writes, processes, pinned kernels, statistics,
                                         exact math, JSON values, the one Registry
 1. cmkd.data (+ cmkd.geometry)          prepared-file format, loader, augmentation, the dataset
                                         registry, readers (datasets/) and offline samples (samples/)
 2. cmkd.models, cmkd.losses             networks and loss functions
 3. cmkd.training                        the loop, its config, checkpoints, logit cache, metrics
 4. cmkd.methods                         the distillers; above training, because a method may train
                                         a network itself (MG-KD's Algorithm 1 retrains the teacher
                                         with the training loop)
 5. cmkd.config                          params.yaml checked as a whole: it asks the data, models,
                                         training and methods layers to check their sections
 6. cmkd.reporting                       result files -> tables, figures, claims, README blocks; it
                                         reads results and never needs how they were computed
 7. cmkd.diagnosis                       indicators, predictor, reports (compares a measured gain
                                         with the table's paired statistic, cmkd.reporting.tables)
 8. cmkd.experiments                     the papers' synthetic experiments (they measure the
                                         diagnosis indicators on every slice)
 9. cmkd.pipeline                        what the stage scripts call: paths, training and tuning
                                         stages, code dependencies
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cmkd"

LAYERS = [
    ("cmkd", "cmkd.errors", "cmkd.utils"),
    ("cmkd.data", "cmkd.geometry"),
    ("cmkd.models", "cmkd.losses"),
    ("cmkd.training",),
    ("cmkd.methods",),
    ("cmkd.config",),
    ("cmkd.reporting",),
    ("cmkd.diagnosis",),
    ("cmkd.experiments",),
    ("cmkd.pipeline",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in `tree` may import (any depth)."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                todo.append(ast.Module(body=child.orelse, type_ignores=[]))  # the `if` body never runs
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base_parts = module.split(".") if is_package else module.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (child.level - 1)]
                    base = ".".join(base_parts + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # a submodule, or a name
            todo.append(child)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the cmkd modules it imports (with their parent packages), itself excluded."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for imported in imported_names(tree, name, path.name == "__init__.py"):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules:
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> int | None:
    """The layer of the longest matching prefix (so `cmkd.utils.x` is not `cmkd`'s)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_local_and_type_checking_imports_are_told_apart():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cmkd.x\n"
                     "def f():\n    from cmkd.y import z\n")
    assert imported_names(tree, "cmkd.m", False) == {"typing", "typing.TYPE_CHECKING", "cmkd.y", "cmkd.y.z"}


def test_no_import_cycles():
    graph = import_graph(all_modules())
    assert "cmkd.training.data" in graph["cmkd.pipeline.train"]  # the graph is read, not empty
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if layer_of(m) is None]
    assert not missing, f"modules in no layer (add their package to LAYERS and the docstring): {missing}"


def test_no_import_goes_up_a_layer():
    graph = import_graph(all_modules())
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", ["cmkd", "cmkd.pipeline", "cmkd.data", "cmkd.training", "cmkd.utils"])
def test_package_init_files_import_nothing(module):
    # importing a package has no side effects and does not pull its layer in (cmkd.methods and
    # cmkd.models hold their registries, cmkd.data.registry the datasets')
    path = all_modules()[module]
    assert not imported_names(ast.parse(path.read_text()), module, True)
