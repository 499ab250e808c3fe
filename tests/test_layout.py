"""The house rules, read from the source: the top level, the packages' layers, no import circles.

Every import counts, also those inside functions (the project imports
TensorFlow lazily, so most of its imports are there): a circle closed by a
lazy import is still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess

import pytest

from tests.conftest import ROOT

TOP_LEVEL = {
    # the card's layout
    "setup.cfg",
    "README.md",
    "data",
    "models",
    "utils",
    "main.py",
    "train.py",
    "tests",
    "notebooks",
    # the evaluation script, and what supports the project without being imported by it
    "evaluate.py",
    "examples",
    "bench",
    "docs",
    "scripts",
    # the SavedModel export and the HTTP server (`main.py export`, `main.py serve`)
    "serving",
    # the build backend and ruff's settings (neither reads setup.cfg)
    "pyproject.toml",
}

# What each part may import from the project (besides itself). Lower layers never
# reach up: utils knows nothing of data or models, and no package knows main.py.
LAYERS = {
    "utils": set(),
    "data": {"utils"},
    "models": {"utils", "data"},
    "serving": {"utils", "data", "models"},
    "<top>": {"utils", "data", "models", "serving", "<top>"},
    "bench": {"utils", "data", "models", "serving", "<top>"},
    "examples": {"utils"},
    "scripts": {"utils", "data", "models"},  # experiments: they build presets, read data
}


def project_modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every Python file of the project (tests excluded)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("tests", "runs", "prepared"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` imports the module pkg.sub when there is one
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            names = [n for n in names if n in modules] or [node.module]
            if len(names) > 1 and node.module in names:
                names.remove(node.module)
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` -> the deepest project module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def part(module: str) -> str:
    head = module.split(".")[0]
    return head if "." in module or head in LAYERS else "<top>"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_the_top_level_is_the_cards_layout():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    top = {f.split("/")[0] for f in tracked if not f.startswith(".")}
    assert top <= TOP_LEVEL, f"not in the layout: {sorted(top - TOP_LEVEL)}"
    assert {"main.py", "train.py", "evaluate.py", "data", "models", "utils"} <= top


def test_each_package_imports_only_the_layers_below_it(graph):
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if part(target) != part(module) and part(target) not in LAYERS[part(module)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_there_are_no_import_circles(graph):
    circles = strongly_connected(graph)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_walker_sees_lazy_imports_and_circles(tmp_path):
    """The two checks above can fail: a planted circle through a function-level import."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    planted = {name: imports_of(path, modules) for name, path in modules.items()}
    assert planted == {"a": {"b"}, "b": {"a"}}
    assert strongly_connected(planted) == [["a", "b"]]


def test_tests_do_not_import_each_other():
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_"):
                offenders.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Import) and any(
                a.name.startswith("tests.test_") for a in node.names
            ):
                offenders.append(f"{path.name} imports {[a.name for a in node.names]}")
    assert not offenders, "shared helpers belong in tests/conftest.py:\n" + "\n".join(offenders)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's circles: its strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(circles)
