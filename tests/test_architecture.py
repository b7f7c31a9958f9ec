"""The import graph, read from the code's own imports: no circles, and no import from a lower floor to a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGES = ("engine", "pipelines", "cluster")
#: The floors, lowest first: a module imports only from its own floor or lower ones. ``engine.layout`` and
#: ``engine.tasks`` (the workspace's paths, running tasks) are the ground every floor stands on.
FLOORS = ["engine.layout", "engine.tasks", "engine.data", "engine.analysis", "engine.models", "engine.outputs",
          "cluster", "pipelines"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the packages and the modules of the packages it imports (at any depth of its code)."""
    files = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def floor(module: str) -> int:
    if module == "engine":  # the package's front door (open_workspace) stands with the outputs
        return FLOORS.index("engine.outputs")
    return max(index for index, prefix in enumerate(FLOORS) if module == prefix or module.startswith(prefix + "."))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_is_read_from_the_code():
    graph = import_graph()
    assert "engine.data.labels" in graph["engine.data.store"] | graph["engine.data.inputs"]
    assert "engine.data.store" in graph["engine.models.relevance"]
    assert "cluster.pooled" in graph["cluster.slurm"]  # a function-level import counts too
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds circles


def test_no_module_imports_a_module_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_higher_floor():
    graph = import_graph()
    upward = sorted(f"{module} → {other}" for module, imported in graph.items() for other in imported
                    if floor(other) > floor(module))
    assert upward == []
    engine = {other for module, imported in graph.items() if module.startswith("engine") for other in imported}
    assert not {module for module in engine if module.startswith(("pipelines", "cluster"))}
