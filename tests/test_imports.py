"""The package boundaries, read from the source (no imports run): no import circles among the
project's modules, and data_prep (the torch-light data side) reaches into pipeline in one place only."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph() -> dict:
    """module -> the project modules it imports (static; function-level imports included)."""
    files = {}
    for package in ("pipeline", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                relative = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".")
                base = relative if node.level else node.module
                # `from pkg import name`: the submodule `name` if there is one, else pkg itself
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def circles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40 and "pipeline.train.trainer" in graph["pipeline.train"]
    assert circles(graph) == []
    # the check can fail: a module importing back its importer makes a circle
    looped = {**graph, "pipeline.precision": graph["pipeline.precision"] | {"pipeline.train.trainer"}}
    assert circles(looped)


def test_data_prep_reaches_into_pipeline_only_for_the_warp():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() if a.startswith("data_prep")
                    for b in targets if b.startswith("pipeline"))
    # the distortions warp with the models' own sampler (one definition of the warp kinds)
    assert upward == [("data_prep.distortions", "pipeline.models.spatial_transformer")]
