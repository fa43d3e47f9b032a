"""The import graph runs one way: contracts at the bottom, commands on top (ARCHITECTURE.md).

Every import counts, those inside functions too: a lazy import up the layers is still an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = ("fedrad", "client", "server", "privacy", "models")

# Layer of each part (longest prefix wins); an import may only point to a lower layer or
# stay inside its own part.
LAYERS: dict[str, int] = {
    "fedrad.core": 0,
    "models": 1,
    "privacy": 1,
    "fedrad.synth": 1,
    "fedrad.npz_import": 2,
    "client": 2,
    "server": 2,
    "fedrad.commands": 3,
    "fedrad": 0,  # the package root alone (not its subpackages): a docstring and the version
}
ROOT_PACKAGE = "fedrad"


def _part(module: str) -> str:
    if module == ROOT_PACKAGE:
        return ROOT_PACKAGE
    best = ""
    for prefix in LAYERS:
        if prefix != ROOT_PACKAGE and (module == prefix or module.startswith(prefix + ".")):
            best = prefix if len(prefix) > len(best) else best
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for package in OWN:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(imported module, names, line, at module level) for every import of our own packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OWN:
                    out.append((alias.name, [], node.lineno, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in OWN:
                names = [a.name for a in node.names]
                out.append((target, names, node.lineno, id(node) in top_level))
    return out


SOURCES = _sources()
EDGES = {module: _imports(module, path) for module, path in SOURCES.items()}


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [m for m in SOURCES if not _part(m)]
    assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_imports_point_down_the_layers(module: str) -> None:
    here = _part(module)
    wrong = []
    for target, _, line, _ in EDGES[module]:
        there = _part(target)
        if there == here:
            continue
        if LAYERS[there] >= LAYERS[here]:
            wrong.append(f"{SOURCES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports up or across the layers (see ARCHITECTURE.md):\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_imports_another_modules_private_names(module: str) -> None:
    wrong = []
    for target, names, line, _ in EDGES[module]:
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != module:
            wrong.append(f"{SOURCES[module].relative_to(ROOT)}:{line}: {target} {private}")
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)


def test_module_level_imports_have_no_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module, edges in EDGES.items():
        for target, names, _, top in edges:
            if not top:
                continue
            # "from package import submodule" depends on the submodule itself
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in SOURCES] or [target]
            graph[module].update(t for t in targets if t in SOURCES and t != module)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_package_root_imports_nothing_of_its_own() -> None:
    assert EDGES["fedrad"] == []
    assert _part("fedrad.newthing") == ""  # a new subpackage must be given its layer


def test_checks_catch_an_upward_import(tmp_path: Path) -> None:
    # The checks above can fail: a core module importing a command is an upward edge.
    source = tmp_path / "probe.py"
    source.write_text("from fedrad.commands.cli import main\nfrom client.scan import _lost\n")
    edges = _imports("fedrad.core.probe", source)
    assert [(t, LAYERS[_part(t)]) for t, *_ in edges] == [
        ("fedrad.commands.cli", 3),
        ("client.scan", 2),
    ]
    assert LAYERS[_part("fedrad.core.probe")] == 0
    assert edges[1][1] == ["_lost"]
