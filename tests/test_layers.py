"""The import graph keeps the layers of docs/architecture.md: no circle, no upward import, model and data
independent. Read with grimp from the code's own import statements, function-local and TYPE_CHECKING ones
included (a hidden import is still a dependency)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grimp
import pytest

# top to bottom; packages on one line share a layer
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("train", "sft", "grpo", "eval", "generate", "report", "study"),
    ("runs", "hf"),
    ("model", "data"),
    ("config",),
    ("core",),
]
# packages of one layer that may import each other (the engines use each other's public API; the graph
# between them must still be acyclic)
SHARED = {"train", "sft", "grpo", "eval", "generate", "report", "study"}
LEVEL = {package: len(LAYERS) - i for i, row in enumerate(LAYERS) for package in row}


def top_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: `archifactory` itself (its __init__/__main__)


def layer_violations(imports: set[tuple[str, str]]) -> list[str]:
    """Every import that runs upward or sideways between packages that must be independent."""
    problems = []
    for importer, imported in sorted(imports):
        src, dst = top_package(importer), top_package(imported)
        if src is None or dst is None or src == dst or src not in LEVEL or dst not in LEVEL:
            continue
        if LEVEL[src] < LEVEL[dst]:
            problems.append(f"upward: {importer} -> {imported}")
        elif LEVEL[src] == LEVEL[dst] and not (src in SHARED and dst in SHARED):
            problems.append(f"sideways: {importer} -> {imported}")
    return problems


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def package_edges(imports: set[tuple[str, str]]) -> set[tuple[str, str]]:
    edges = set()
    for importer, imported in imports:
        src, dst = top_package(importer), top_package(imported)
        if src and dst and src != dst:
            edges.add((src, dst))
    return edges


@pytest.fixture(scope="module")
def imports() -> set[tuple[str, str]]:
    graph = grimp.build_graph("archifactory", include_external_packages=False, cache_dir=None)
    return {
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
    }


def test_every_package_has_a_layer() -> None:
    root = Path(__file__).resolve().parents[1] / "archifactory"
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LEVEL), "a new top-level package needs its layer in docs/architecture.md and here"


def test_no_import_runs_upward_or_between_independent_siblings(imports) -> None:
    assert layer_violations(imports) == []


def test_no_import_circle_between_modules_or_packages(imports) -> None:
    assert cycles(imports) == []
    assert cycles(package_edges(imports)) == []


def test_the_check_fails_on_a_model_module_importing_the_cli(tmp_path, monkeypatch) -> None:
    """The check is not vacuous: a copy of the package where model/ imports the CLI is refused."""
    fake = tmp_path / "layered_probe"  # another name: `archifactory` itself is imported already
    for package in LEVEL:
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "cli" / "main.py").write_text("from layered_probe.model import stack\n")
    (fake / "model" / "stack.py").write_text(
        textwrap.dedent("""
            def build():
                from layered_probe.cli.main import config_dir  # hidden in a function: still a dependency
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("layered_probe", include_external_packages=False, cache_dir=None)
    edges = {(m, d) for m in graph.modules for d in graph.find_modules_directly_imported_by(m)}
    assert layer_violations(edges) == ["upward: layered_probe.model.stack -> layered_probe.cli.main"]
    assert cycles(edges) == [["layered_probe.cli.main", "layered_probe.model.stack"]]
