"""The package's floors: each module imports only from the floors below its own (function-local imports count),
and no modules import each other round in a cycle. `make lint` runs this file."""

from __future__ import annotations

import ast
from pathlib import Path

import dtrain

PACKAGE = Path(dtrain.__file__).parent
# Top first; a module may import its own folder and the floors below it, never one beside it.
FLOORS = (("cli", "recipes"), ("export",), ("launch", "runtime"), ("engines", "outputs"), ("core",), ("errors", "__init__"))


def floor_of(module: str) -> tuple[int, str]:
    """(floor, folder) of a dotted module under dtrain."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for level, folders in enumerate(FLOORS):
        if top in folders:
            return len(FLOORS) - level, top
    raise AssertionError(f"{module} is in no floor; add its folder to FLOORS")


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its source. `from dtrain.x import y` imports
    dtrain.x.y when that is a module, else dtrain.x."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return found & known


def graph(sources: dict[str, str], packages: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Module -> the modules of `sources` it imports."""
    known = set(sources)
    return {module: imports_of(module, text, module in packages, known) - {module} for module, text in sources.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a floor or sideways into another folder of the same floor."""
    found = []
    for module, targets in sorted(edges.items()):
        level, folder = floor_of(module)
        for target in sorted(targets):
            target_level, target_folder = floor_of(target)
            if target_folder != folder and target_level >= level:
                found.append(f"{module} imports {target}")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among the modules (each strongly connected set of more than one module, or a self loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_sources() -> tuple[dict[str, str], frozenset[str]]:
    sources, packages = {}, set()
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text()
    return sources, frozenset(packages)


def test_every_import_goes_down_a_floor_and_none_goes_round():
    edges = graph(*package_sources())
    assert violations(edges) == []
    assert cycles(edges) == []


def test_only_the_cli_and_the_errors_sit_at_the_top_of_the_package():
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "cli.py", "errors.py"]


def test_the_contract_catches_an_upward_import_a_sideways_one_and_a_cycle():
    sources = {
        "dtrain.core.options": "from dtrain.launch import job\n",  # up
        "dtrain.launch.job": "def f():\n    from dtrain.runtime import dist\n",  # sideways, function-local
        "dtrain.runtime.dist": "from dtrain.errors import UsageError\n",
        "dtrain.outputs.trackers": "from dtrain.outputs import report\n",
        "dtrain.outputs.report": "from .trackers import redact\n",  # a cycle inside one folder, relative
    }
    edges = graph(sources)
    assert violations(edges) == ["dtrain.core.options imports dtrain.launch.job",
                                 "dtrain.launch.job imports dtrain.runtime.dist"]
    assert cycles(edges) == [["dtrain.outputs.report", "dtrain.outputs.trackers"]]
