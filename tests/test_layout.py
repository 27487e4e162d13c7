"""The package's shape holds (docs/design.md section 1): imports point down the layers, with no cycle, deferred
imports inside functions included; the top level stays small; no module grows past ~400 lines; every subpackage
says what it owns and what it may import."""
from __future__ import annotations

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "vqprior"
TOP_LEVEL = {"errors", "config", "levels", "io", "images", "checkpoint"}
# What each part may import besides itself and the low modules (errors, config, levels, io, the version).
ALLOWED = {
    "images": set(),
    "checkpoint": {"models"},
    "runtime": set(),
    "models": set(),
    "data": {"images"},
    "sampling": {"models", "runtime", "images"},
    "evaluation": {"models", "data", "runtime"},
    "compress": {"models", "sampling", "runtime", "data"},
    "training": {"models", "runtime", "data", "sampling", "evaluation", "images", "checkpoint"},
}
LOW = {"errors", "config", "levels", "io", "__init__"}


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path) -> set[str]:
    """Every vqprior module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vqprior"):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vqprior"))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_follow_the_layers(graph):
    wrong = []
    for module, imported in graph.items():
        area = _area(module)
        for target in imported:
            to = _area(target)
            if to == area or to in LOW or area == "__init__":
                continue
            if to not in ALLOWED[area]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or (target == "vqprior" or module.startswith(target + ".")):
                continue  # a module's own package __init__ is not a dependency edge between modules
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [module, target]))
            if target not in state:
                visit(target, stack + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_top_level_is_small_and_every_subpackage_documents_its_imports():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top <= TOP_LEVEL and len(top) <= 8, sorted(top)
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init.relative_to(REPO)}: say what the subpackage may import"


def test_no_module_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n}" for p in [*PACKAGE.rglob("*.py"), *(REPO / "commands").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
