"""The package's imports form a one-way graph: no cycles, and no import of jlora hidden
inside a function (the usual way to dodge a cycle). Read from the source with ``ast``."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jlora"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _target(name: str) -> str:
    """The jlora module an import of ``name`` loads: ``name`` itself, or for ``from pkg
    import attr`` where ``pkg.attr`` is not a module, ``pkg``."""
    return name if name in MODULES else name.rsplit(".", 1)[0]


def _imports(tree: ast.AST, module: str):
    """``(jlora module imported, node)`` for every import in ``tree``."""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jlora":
                    yield _target(alias.name), node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "jlora":
                continue
            for alias in node.names:
                yield _target(f"{base}.{alias.name}"), node


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        # A package's own submodules are where it gets its names from: only edges from
        # modules to the modules they name count, not to the packages that contain them.
        graph[module] = {t for t, _ in _imports(tree, module) if t != module}
    return graph


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_of_jlora_inside_a_function(module):
    tree = ast.parse(MODULES[module].read_text())
    hidden = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            hidden += [f"line {node.lineno}: imports {t}" for t, node in _imports(fn, module)]
    assert not hidden, f"{module} imports jlora modules inside functions: {sorted(set(hidden))}"


def test_imports_form_a_one_way_graph():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep in graph and dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_walk_sees_the_package():
    # The checks above mean something only if they read the real import structure.
    graph = _graph()
    assert len(MODULES) > 30
    assert "jlora.layouts" in graph["jlora._adapter"]
    assert "jlora._transform.api" in graph["jlora"]


# A module holds one concern and a class one idea: past these sizes, split it.
MAX_MODULE_LINES = 550
MAX_CLASS_LINES = 220


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_classes_stay_small(module):
    source = MODULES[module].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{module}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{module}.{node.name}: {size} lines"
