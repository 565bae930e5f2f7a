"""The architecture's rules: each layer (a subpackage of kd_tune) imports only the layers below it and only the
third-party libraries it is allowed, checked two ways: in the source (every ``import``, also inside functions) and
by importing each layer's modules in a fresh interpreter (what really gets loaded); and no module imports itself back
through others (no import cycle, within a layer or across, function-level imports included: :func:`import_graph`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kd_tune"

# layer -> (kd_tune layers it may import, third-party packages it must not load)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "core": (set(), {"torch", "numpy", "ray", "mlflow", "pyarrow", "pandas", "yaml"}),
    "space": ({"core", "data.registry"}, {"torch", "numpy", "ray", "mlflow", "pyarrow", "pandas"}),
    "data": ({"core", "data"}, {"ray", "mlflow", "pyarrow", "pandas"}),
    "distill": ({"core", "space", "data", "distill"}, {"ray", "mlflow", "pyarrow", "pandas"}),
    "tracking": ({"core", "space", "data", "distill", "tracking"}, {"ray"}),
    "report": ({"core", "space", "tracking.tags", "report"}, {"ray", "torch"}),  # pandas loads pyarrow
    "sweep": ({"core", "space", "data", "distill", "tracking", "report", "sweep"}, set()),
    # The Python API: everything below it, each imported where a function needs it, so `import kd_tune.api` loads no library.
    "api": ({"core", "space", "data", "distill", "tracking", "report", "sweep"}, {"torch", "numpy", "ray", "mlflow", "pyarrow", "pandas", "yaml"}),
    "cli": ({"core", "space", "data", "distill", "tracking", "report", "sweep", "api", "cli"}, set()),
}
CORE = {"errors", "files", "process"}
TOP_MODULES = {"api"}
"""Layers that are one module directly under kd_tune/ (not a subpackage, not the core)."""


def _layer(module: str) -> str:
    """``kd_tune.distill.train`` -> ``distill``; the top-level modules are the core, but for the layers of their own (``api``)."""
    part = module.split(".")[1]
    return "core" if part in CORE else part


def _modules(layer: str) -> list[str]:
    files = ([PACKAGE / f"{m}.py" for m in CORE] if layer == "core" else [PACKAGE / f"{layer}.py"] if layer in TOP_MODULES
             else sorted((PACKAGE / layer).rglob("*.py")))
    out = []
    for f in files:
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__main__"):
            continue
        out.append(name.removesuffix(".__init__"))
    return out


def _allowed(target: str, allowed: set[str]) -> bool:
    """Whether ``kd_tune.<rest>`` is in one of the ``allowed`` layers (``data``) or modules (``data.registry``)."""
    if _layer(target) == "core":
        return "core" in allowed
    rest = target.split(".", 1)[1]
    return any(rest == a or rest.startswith(a + ".") for a in allowed)


def test_every_module_belongs_to_a_layer() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == CORE | TOP_MODULES
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(RULES) - {"core"} - TOP_MODULES


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed, _ = RULES[layer]
    bad = []
    for module in _modules(layer):
        path = PACKAGE.parent / (module.replace(".", "/") + ("/__init__.py" if (PACKAGE.parent / module.replace(".", "/")).is_dir() else ".py"))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "kd_tune":  # from kd_tune import x
                names = [f"kd_tune.{a.name}" for a in node.names]
            for target in names:
                if target.startswith("kd_tune.") and _layer(target) != layer and not _allowed(target, allowed):
                    bad.append(f"{module} imports {target}")
    assert not bad, bad


@pytest.mark.parametrize("layer", sorted(layer for layer, (_, banned) in RULES.items() if banned))
def test_layer_loads_none_of_its_banned_libraries(layer: str) -> None:
    _, banned = RULES[layer]
    code = (f"import importlib, sys\nfor m in {_modules(layer)!r}: importlib.import_module(m)\n"
            f"print(sorted(b for b in {sorted(banned)!r} if b in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"{layer} loads {proc.stdout.strip()}"


# Import cycles. The graph: module -> the package's modules it imports, read from the source with ``ast`` (every
# ``import`` and ``from ... import`` anywhere in the file: at the top, inside functions, ``try`` blocks and classes),
# since a function-level import only hides a cycle until that function runs. How a statement resolves:
# - ``import pkg.a.b`` (with or without ``as``) -> ``pkg.a.b``: a package's edge goes to its ``__init__.py``;
# - ``from pkg.a import y`` -> ``pkg.a.y`` where ``pkg/a/y.py`` or ``pkg/a/y/`` exists, else ``pkg.a`` (y is a name
#   defined in it); ``from pkg import *`` -> ``pkg``; relative imports resolve against the module's own package;
# - a name that is no module of the package resolves to its longest prefix that is one (an import of an attribute).
# Not edges: the parent packages that Python runs first for ``pkg.a.b`` (``pkg``, ``pkg.a``): counting them would make
# every package whose ``__init__`` imports its submodules a cycle with each of them, though importing ``pkg.a.b`` first
# is fine there (the ``__init__`` runs, imports ``b``, which finds its own imports done). A package ``__init__`` that
# imports its submodules while one of them imports a name *from the package* is a cycle, and is one: the submodule
# then runs against a half-initialised package. Not edges either: a module's import of itself, and anything under
# ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``), which never runs (its ``else:`` does, and counts).


def _module_name(root: Path, file: Path) -> str:
    """``root/a/b.py`` -> ``<root's name>.a.b``; ``root/a/__init__.py`` -> ``<root's name>.a``."""
    parts = (root.name, *file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` that can run: all of them but those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package at ``root`` (a folder with an ``__init__.py``) that it imports; see above."""
    files = {_module_name(root, f): f for f in sorted(root.rglob("*.py")) if "__pycache__" not in f.parts}
    top = root.name

    def known(name: str) -> str | None:
        """``name`` if it is a module of the package, else its longest prefix that is; None outside the package."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        targets: list[str] = []
        for node in _import_nodes(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's own package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
        graph[module] = {t for t in (known(t) for t in targets if t == top or t.startswith(top + ".")) if t and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of ``graph`` that has one, each the shortest through the component's
    first module in sorted order, as ``[a, b, ..., a]``; sorted, so the answer is the same every run."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first, back to start: the shortest cycle through it
            v = queue.popleft()
            if v != start and start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                cycles.append([*reversed(path), start])
                break
            for w in sorted(graph[v] & component):
                if w not in came_from and w != start:
                    came_from[w] = v
                    queue.append(w)
    return sorted(cycles)


def test_no_import_cycles() -> None:
    cycles = [" -> ".join(c) for c in import_cycles(import_graph(PACKAGE))]
    assert not cycles, "import cycles (break them with a leaf module both sides import):\n" + "\n".join(cycles)


def test_import_cycles_of_a_small_graph() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a", "f"}, "f": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_cycle_check_finds_cycles_planted_in_a_package(tmp_path: Path) -> None:
    """The same functions, pointed at a package written here: each way a cycle hides, and what is not one."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        # a package that imports its families to register them, while a family imports from the package: a cycle
        "reg/__init__.py": "from pkg.reg import fam\n",
        "reg/fam.py": "from pkg.reg import register\n",
        # the same with a leaf: no cycle
        "ok/__init__.py": "from pkg.ok import fam\nfrom pkg.ok.registry import register\n",
        "ok/fam.py": "from pkg.ok.registry import register\n",
        "ok/registry.py": "import os\n",
        # hidden behind a function-level import, with ``import ... as``
        "data/__init__.py": "",
        "data/custom.py": "def load():\n    from pkg.data.split import subset\n    return subset\n",
        "data/split.py": "import pkg.data.custom as custom\n",
        # relative imports
        "rel/__init__.py": "",
        "rel/p.py": "from . import q\n",
        "rel/q.py": "try:\n    from .p import x\nexcept ImportError:\n    pass\n",
        # only for the type checker: never runs, no cycle (its else does run)
        "typed/__init__.py": "",
        "typed/z.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.typed.w import W\nelse:\n    from pkg import ok\n",
        "typed/w.py": "from pkg.typed import z\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["pkg.typed.z"] == {"pkg.ok"}
    assert graph["pkg.ok"] == {"pkg.ok.fam", "pkg.ok.registry"}
    assert [" -> ".join(c) for c in import_cycles(graph)] == [
        "pkg.data.custom -> pkg.data.split -> pkg.data.custom", "pkg.reg -> pkg.reg.fam -> pkg.reg", "pkg.rel.p -> pkg.rel.q -> pkg.rel.p"]
