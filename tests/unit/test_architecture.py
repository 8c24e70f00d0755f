"""The layering the design rests on, read from the source: Flower only in fedlora/flower/, strategies
pure tensor math, and no import circle between the project's modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for fedlora/ and strategies/."""
    out = {}
    for path in sorted([*ROOT.glob("fedlora/**/*.py"), *ROOT.glob("strategies/*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (``from a import b``: a.b when
    that is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_flower_is_imported_only_in_fedlora_flower() -> None:
    outside = {
        name: sorted(i for i in imports(path) if i == "flwr" or i.startswith("flwr."))
        for name, path in modules().items()
        if not name.startswith("fedlora.flower")
    }
    assert {name: flwr for name, flwr in outside.items() if flwr} == {}


def test_strategies_are_pure_tensor_math() -> None:
    for name, path in modules().items():
        if name.startswith("strategies"):
            assert not {i for i in imports(path) if i.startswith(("flwr", "fedlora.flower", "opacus", "hydra"))}, name


def test_no_import_circle() -> None:
    mods = modules()
    graph = {name: {i for i in imports(path) if i in mods and i != name} for name, path in mods.items()}
    # A package's __init__ only re-exports its modules: an edge into a package's own module is not a circle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(f"{nxt}."):  # a module importing its own package's __init__ (re-exports)
                continue
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*stack[stack.index(nxt) :], nxt])}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
