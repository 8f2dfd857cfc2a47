"""The import graph of ``kernels``, ``models`` and ``dse`` follows the layers of the package map.

Every module is read with ``ast`` (nothing is imported), so the graph holds module-level imports and the
imports inside functions alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "dse")

# Lowest first. A module may import its own layer and the layers above it in this list, never one below.
# A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("kernels",)),
    ("models", ("models",)),
    ("base", ("dse", "dse.errors", "dse.fileio", "dse.config", "dse.checkpoints")),
    ("hardware", ("dse.hardware",)),
    ("profiling", ("dse.profiling",)),
    ("cost", ("dse.cost",)),
    ("training", ("dse.training",)),
    ("search", ("dse.search",)),
    ("deploy", ("dse.deploy",)),
    ("pipeline", ("dse.pipeline",)),
    ("entry points", ("dse.commands", "dse.cli", "dse.__main__", "dse.benchmarks")),
]

# Imports inside functions hide dependencies; the few left keep an optional, heavy import off a cheap path.
MAX_FUNCTION_IMPORTS = 14


def _module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _module_files()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``dse.cost.model.CostModel`` -> ``dse.cost.model``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported project module, inside a function, line)`` for every import statement of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                targets = [_resolve(a.name) for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - child.level + 1], base]).strip(".")
                targets = [_resolve(f"{base}.{a.name}") for a in child.names]
            else:
                visit(child, nested)
                continue
            found.extend((t, in_function, child.lineno) for t in dict.fromkeys(targets) if t and t != module)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer; add it to LAYERS"
    return rank


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in GRAPH[v]}:
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for module in MODULES:
        if module not in index:
            connect(module)
    return out


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycles():
    assert _cycles() == [], "import cycles between these modules"


def test_no_import_from_a_higher_layer():
    upward = [
        f"{module}:{line} imports {target} ({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})"
        for module, edges in GRAPH.items()
        for target, _, line in edges
        if layer_of(target) > layer_of(module)
    ]
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_few_imports_inside_functions():
    inside = [f"{module}:{line} imports {target}" for module, edges in GRAPH.items()
              for target, in_function, line in edges if in_function]
    assert len(inside) <= MAX_FUNCTION_IMPORTS, "project imports inside functions:\n" + "\n".join(inside)
