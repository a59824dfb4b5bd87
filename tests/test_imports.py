"""The package's import graph: every module imports, no cycles (not even through function-local imports),
models/ and data/ never import training/ (training is built on them, not the other way round), and models/ and data/
never import each other (what both need of a batch is automodel/batch.py, which imports neither)."""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import automodel

PACKAGE = Path(automodel.__file__).parent
LOWER_LAYERS = ("automodel.models", "automodel.data")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The automodel modules an import statement depends on (`from package import submodule` depends on the
    submodule, not on whatever else the package's __init__ offers)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
        names = submodules + ([base] if len(submodules) < len(node.names) else [])
    found = []
    for name in names:
        while name and name not in MODULES:  # `import automodel.x.y` of a name inside a module: the module
            name = name.rpartition(".")[0]
        if name.startswith("automodel") and name != module:
            found.append(name)
    return found


@functools.cache
def import_graph(function_local: bool) -> dict[str, set[str]]:
    """module -> the automodel modules it imports at module level (and, if `function_local`, anywhere in it)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = ast.walk(tree) if function_local else _module_level(tree.body)
        graph[module] = {target for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in imported(module, node)}
    return graph


def _module_level(body: list[ast.stmt]):
    """Statements run at import: the module body, including its top-level `if` / `try` blocks."""
    for statement in body:
        yield statement
        if isinstance(statement, (ast.If, ast.Try)):
            handlers = [h.body for h in getattr(statement, "handlers", [])]
            for block in (statement.body, statement.orelse, getattr(statement, "finalbody", []), *handlers):
                yield from _module_level(block)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with an explicit stack)."""
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                done.add(path.pop())
                stack.pop()
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_every_module_imports():
    for module in MODULES:
        if not module.endswith("__main__"):  # `python -m automodel` runs the CLI
            importlib.import_module(module)


def test_the_import_graph_has_no_cycle_even_through_function_local_imports():
    assert len(MODULES) > 100
    for function_local in (False, True):
        assert find_cycle(import_graph(function_local)) is None


def test_models_and_data_never_import_training():
    upward = {module: sorted(t for t in targets if t.startswith("automodel.training"))
              for module, targets in import_graph(function_local=True).items() if module.startswith(LOWER_LAYERS)}
    assert {module: targets for module, targets in upward.items() if targets} == {}


def crossings(graph: dict[str, set[str]], source: str, target: str) -> dict[str, list[str]]:
    """module of `source` -> the modules of `target` it imports (packages by dotted prefix)."""
    inside = lambda module, package: module == package or module.startswith(package + ".")  # noqa: E731
    found = {module: sorted(t for t in targets if inside(t, target))
             for module, targets in graph.items() if inside(module, source)}
    return {module: targets for module, targets in found.items() if targets}


def test_models_and_data_never_import_each_other():
    graph = import_graph(function_local=True)
    assert crossings(graph, "automodel.models", "automodel.data") == {}
    assert crossings(graph, "automodel.data", "automodel.models") == {}
    below = {target for target in graph["automodel.batch"] if target.startswith("automodel")}
    assert below <= {"automodel.errors"}, "the batch contract sits below models/ and data/"


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The walk itself: a relative import resolves to its module, and a made-up cycle is found."""
    node = ast.parse("from ..data.packing import build_collator\nfrom . import loss").body
    assert imported("automodel.training.kd", node[0]) == ["automodel.data.packing"]
    assert imported("automodel.training.kd", node[1]) == ["automodel.training.loss"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    sideways = {"automodel.data.packing": {"automodel.models.registry", "automodel.batch"},
                "automodel.models.router_aux_loss": {"automodel.data.packing"}, "automodel.batch": set()}
    assert crossings(sideways, "automodel.data", "automodel.models") == {
        "automodel.data.packing": ["automodel.models.registry"]}
    assert crossings(sideways, "automodel.models", "automodel.data") == {
        "automodel.models.router_aux_loss": ["automodel.data.packing"]}
