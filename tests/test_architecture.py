"""The package's layers (DESIGN §13, README "Architecture"): a module imports only from its
own layer or lower ones, and there is no import cycle. Read from the source with ``ast``,
function-level imports included, so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pitstop"

#: Layer of each module or subpackage, bottom (0) to top. A module may import from its own
#: layer or lower ones. ``_distributed`` is the multi-worker layer.
LAYERS: dict[str, int] = {
    "pitstop._errors": 0,
    "pitstop._version": 0,
    "pitstop._format": 1,
    "pitstop._storage": 2,
    "pitstop._state": 2,
    "pitstop._engine": 3,
    "pitstop._distributed": 4,
    "pitstop._manager": 5,
}
TOP = 6  # the public facades, framework adapters, interop, CLI, demo, data
MAX_LINES = 800


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for prefix, n in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return n
    return TOP


def imports(path: Path) -> set[str]:
    """Every pitstop module ``path`` imports (absolute names), at any depth of the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # imports under "if TYPE_CHECKING:" never run
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body for n in ast.walk(stmt)
    }  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pitstop")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pitstop"):
                continue
            for alias in node.names:  # "from . import _x" imports the module pitstop._x
                sub = f"{target}.{alias.name}"
                out.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (SRC.parent / sub.replace(".", "/")).is_dir() else target)  # fmt: skip
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def test_every_import_goes_to_the_same_or_a_lower_layer() -> None:
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph().items()
        for t in targets
        if t != "pitstop" and layer(t) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_below_the_top_imports_the_package_root() -> None:
    offenders = [m for m, targets in graph().items() if layer(m) < TOP and "pitstop" in targets]
    assert not offenders


def test_there_is_no_import_cycle() -> None:
    g = graph()
    # a package imports its own submodules (re-exports): that edge is not a cycle
    edges = {m: {t for t in ts if t in g and not t.startswith(m + ".")} for m, ts in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_over_800_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_layers_with_several_modules_are_subpackages() -> None:
    top_level = {p.stem for p in SRC.glob("_*.py")} - {"__init__", "__main__"}
    for prefix in ("_manifest", "_dtypes", "_storage", "_commit", "_lease", "_tree", "_rng", "_writer", "_reader",
                   "_async", "_snapshot", "_retention", "_policy", "_oneoff", "_preempt"):  # fmt: skip
        assert prefix not in top_level, f"pitstop/{prefix}.py belongs in its layer's subpackage"


def test_the_core_names_no_framework_adapter() -> None:
    """Adapters register themselves (and the facade names them for lazy loading); the
    layers below the top never name pitstop.tensorflow / pitstop.torch."""
    adapters = ("pitstop.tensorflow", "pitstop.torch", "pitstop.jax", "pitstop.keras")
    for path in SRC.rglob("*.py"):
        if layer(module_name(path)) == TOP:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        named = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
            if any(a in n.value for a in adapters)
        ]
        assert not named, f"{path.relative_to(SRC)} names {named}"
