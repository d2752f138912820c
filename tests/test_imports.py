"""The package boundaries, read from the source: no import circles among the project's modules,
data_prep (the data side) never imports pipeline, and the shard/manifest contract imports without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
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


def upward_imports(graph: dict) -> list:
    return sorted((a, b) for a, targets in graph.items() if a.startswith("data_prep")
                  for b in targets if b.startswith("pipeline"))


def test_data_prep_never_imports_pipeline():
    graph = import_graph()
    # pipeline builds on data_prep (the contract, the warp core), never the other way round
    assert ("pipeline.data.manifest", "data_prep.contract") in {(a, b) for a in graph for b in graph[a]}
    assert upward_imports(graph) == []
    # the check can fail: a function-level import of pipeline counts too
    assert upward_imports({**graph, "data_prep.cub": graph["data_prep.cub"] | {"pipeline.config"}})


TORCH_BLOCKED = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import data_prep.contract as contract
import data_prep.verify, data_prep.cub, data_prep.svhn, data_prep.jobs, data_prep.shards
print(contract.TASKS, contract.shard_name("train", 3))
"""


def test_contract_imports_without_torch():
    run = subprocess.run([sys.executable, "-c", TORCH_BLOCKED], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "train-000003.tar" in run.stdout
    # the block works: a module that needs torch fails under it
    run = subprocess.run([sys.executable, "-c", TORCH_BLOCKED + "import data_prep.warp\n"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "torch" in run.stderr
