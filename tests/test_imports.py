"""The core modules (``mixsup/*.py``) import each other without a cycle, counting every import statement.

Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy or type-only import hides a cycle from
the interpreter, not from a reader, and it breaks as soon as someone moves it to the top of the file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "mixsup"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


def core_modules() -> dict[str, Path]:
    """Dotted name -> file of every core module (the package's own ``__init__`` imports none of them)."""
    return {f"{PACKAGE}.{path.stem}": path for path in sorted(PACKAGE_DIR.glob("*.py")) if path.stem != "__init__"}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, from any statement anywhere in the file.

    ``from package import name`` yields both ``package`` and ``package.name``, since ``name`` may be a module;
    relative imports are resolved against ``module``'s package.
    """
    package_parts = module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Core module -> the core modules it imports."""
    modules = core_modules()
    return {
        name: (imported_modules(path.read_text(encoding="utf-8"), name) & modules.keys()) - {name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_core_modules_import_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among mixsup's core modules: " + " -> ".join(cycle)


def test_the_graph_sees_the_dicom_imports():
    # Guards against a vacuous pass: the known edges must be found, and scan must not point back at dicom.
    graph = import_graph()
    assert {"mixsup.dicom", "mixsup.scan"} <= graph["mixsup.readers"]
    assert "mixsup.scan" in graph["mixsup.dicom"]
    assert {"mixsup.dicom", "mixsup.scan"} <= graph["mixsup.dicom_seg"]
    assert not graph["mixsup.scan"] & {"mixsup.dicom", "mixsup.dicom_seg", "mixsup.readers"}


def test_lazy_type_only_and_relative_imports_count():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from mixsup.dicom import DicomSource\n"
        "def read():\n"
        "    import mixsup.readers\n"
        "    from . import stacks\n"
        "    from .files import atomic_path\n"
    )
    found = imported_modules(source, "mixsup.scan")
    assert {"mixsup.dicom", "mixsup.readers", "mixsup.stacks", "mixsup.files"} <= found


@pytest.mark.parametrize(
    "graph, cyclic",
    [
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_find_cycle(graph, cyclic):
    cycle = find_cycle(graph)
    assert (cycle is not None) == cyclic
    if cycle:
        assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
