"""The layering the design rests on, read from the source: a rule per folder, sizes a reader can hold,
no import circle, and a module map in docs/architecture.md that matches the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What fedlora/ may hold at its top: the CLI entry and the shared vocabulary. Everything else lives in a folder.
TOP_LEVEL = {"fedlora", "fedlora.cli", "fedlora.lora", "fedlora.seeds"}

# Folder -> the project's packages it may import (itself always). The client side (learning, privacy,
# federation) never sees Flower, outputs or commands; strategies/ is pure tensor math on fedlora.lora.
VOCABULARY = {"fedlora.lora", "fedlora.seeds"}
CLIENT_SIDE = {"fedlora.config", "fedlora.learning", "fedlora.privacy", "fedlora.federation", "strategies"}
MAY_IMPORT = {
    "strategies": {"fedlora.lora"},
    "fedlora.lora": set(),
    "fedlora.seeds": set(),
    "fedlora.config": {*VOCABULARY, "strategies"},
    "fedlora.learning": {*VOCABULARY, *CLIENT_SIDE},
    "fedlora.privacy": {*VOCABULARY, *CLIENT_SIDE},
    "fedlora.federation": {*VOCABULARY, *CLIENT_SIDE},
    "fedlora.outputs": {*VOCABULARY, *CLIENT_SIDE, "fedlora"},  # fedlora: __version__ in exports
    "fedlora.flower": {*VOCABULARY, *CLIENT_SIDE, "fedlora.outputs"},
    "fedlora.deploy": {*VOCABULARY, "fedlora.config"},
    "fedlora.commands": {*VOCABULARY, *CLIENT_SIDE, "fedlora", "fedlora.outputs", "fedlora.flower", "fedlora.deploy"},
    "fedlora.cli": {*VOCABULARY, "fedlora.config", "fedlora.outputs", "fedlora.commands"},
    "fedlora": {"fedlora.outputs", "fedlora.config", "fedlora.commands", "fedlora.learning"},  # the public API
}
MAX_MODULE_LINES = 300
MAX_CLASS_LINES = 200


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for fedlora/ and strategies/."""
    out = {}
    for path in sorted([*ROOT.glob("fedlora/**/*.py"), *ROOT.glob("strategies/*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES: dict[str, Path] = modules()


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (``from a import b``: a.b when
    that is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = names & set(MODULES)
            found |= submodules or {node.module}  # ``from fedlora import lora`` imports fedlora.lora only
            found |= names - submodules
    return found


def folder(module: str) -> str:
    """The rule's key for a module: its folder (fedlora.learning.data -> fedlora.learning), or itself at the top."""
    if module == "strategies" or module.startswith("strategies."):
        return "strategies"
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or f"{module}" not in TOP_LEVEL else module


def project(name: str) -> str | None:
    """The folder (rule key) of an imported name of this project, or None for a library."""
    if name == "fedlora" or name.startswith(("fedlora.", "strategies")):
        mods = MODULES
        while name not in mods and "." in name:  # fedlora.config.run.RunConfig -> fedlora.config.run
            name = name.rsplit(".", 1)[0]
        return folder(name) if name in mods else None
    return None


def test_fedlora_top_level_holds_only_the_entry_and_the_vocabulary() -> None:
    top = {name for name, path in modules().items() if name.startswith("fedlora") and path.parent == ROOT / "fedlora"}
    top = {name for name in top if modules()[name].name != "__init__.py" or name == "fedlora"}
    assert top <= TOP_LEVEL, sorted(top - TOP_LEVEL)


@pytest.mark.parametrize("rule", sorted(MAY_IMPORT))
def test_each_folder_imports_only_what_its_rule_allows(rule: str) -> None:
    broken = {}
    for name, path in modules().items():
        if folder(name) != rule:
            continue
        used = {project(i) for i in imports(path)} - {None, rule}
        if bad := sorted(used - MAY_IMPORT[rule]):  # type: ignore[operator]
            broken[name] = bad
    assert broken == {}, f"{rule} may import only {sorted(MAY_IMPORT[rule])}"


def test_every_module_is_in_a_folder_with_a_rule() -> None:
    assert {folder(name) for name in modules()} <= set(MAY_IMPORT)


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


def test_no_module_or_class_too_long_to_hold() -> None:
    long = {}
    for name, path in modules().items():
        source = path.read_text()
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            long[name] = n
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                long[f"{name}.{node.name}"] = n
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines or classes over {MAX_CLASS_LINES}"


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
            if node.startswith(f"{nxt}.") or nxt.startswith(f"{node}."):  # a package and its own modules
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


def test_the_module_map_in_docs_matches_the_tree() -> None:
    """docs/architecture.md names every module of fedlora/ and strategies/ once, and nothing else."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```")[1]  # the first code block is the map
    documented: set[str] = set()
    folders: list[str] = []  # the folders enclosing the current line, by indentation (two spaces a level)
    for line in block.splitlines():
        if not (m := re.match(r"^( *)(\S+)", line)):
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        elif name.endswith(".py"):
            documented.add("".join(folders) + name)
    documented = {d for d in documented if d.startswith(("fedlora/", "strategies/"))}
    tree = {
        str(path.relative_to(ROOT))
        for path in [*ROOT.glob("fedlora/**/*.py"), *ROOT.glob("strategies/*.py")]
        if path.name != "__init__.py"
    }
    assert sorted(tree - documented) == [], "modules missing from docs/architecture.md's map"
    assert sorted(documented - tree) == [], "modules in the map that do not exist"


OUTSIDE_NOTES = "DESIGN" + ".md"  # the design notes beside the project; spelt in two parts, so this file cites none


def test_the_project_cites_no_document_outside_itself() -> None:
    cited = []
    for path in [*ROOT.glob("**/*.py"), *ROOT.glob("**/*.md"), *ROOT.glob("conf/**/*.yaml"), ROOT / "pyproject.toml"]:
        if ".venv" in path.parts or not path.is_file():
            continue
        if OUTSIDE_NOTES in path.read_text():
            cited.append(str(path.relative_to(ROOT)))
    assert cited == []


def test_the_public_api_is_what_the_docs_import_and_loads_lazily() -> None:
    import subprocess
    import sys

    import fedlora

    assert {"load_exported", "simulate", "compose", "RunConfig", "ConfigError", "model_folder"} <= set(fedlora.__all__)
    assert all(getattr(fedlora, name) is not None for name in fedlora.__all__)
    from fedlora import load_exported
    from fedlora.outputs.export import load_exported as where_it_lives

    assert load_exported is where_it_lives
    cheap = "import sys, fedlora; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", cheap], capture_output=True, text=True, check=True).stdout == "False\n"
    pages = "".join(page.read_text() for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    documented = re.findall(r"from fedlora import ([\w, ]+)", pages)
    for names in documented:
        assert {n.strip() for n in names.split(",")} <= set(fedlora.__all__), names
