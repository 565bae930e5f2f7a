"""The architecture's rules: each layer (a subpackage of kd_tune) imports only the layers below it and only the
third-party libraries it is allowed, checked two ways: in the source (every ``import``, also inside functions) and
by importing each layer's modules in a fresh interpreter (what really gets loaded)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kd_tune"

# layer -> (kd_tune layers it may import, third-party packages it must not load)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "core": (set(), {"torch", "numpy", "ray", "mlflow", "pyarrow", "pandas", "yaml"}),
    "spec": ({"core", "data.registry"}, {"torch", "numpy", "ray", "mlflow", "pyarrow", "pandas"}),
    "data": ({"core", "data"}, {"ray", "mlflow", "pyarrow", "pandas"}),
    "distill": ({"core", "spec", "data", "distill"}, {"ray", "mlflow", "pyarrow", "pandas"}),
    "tracking": ({"core", "spec", "data", "distill", "tracking"}, {"ray"}),
    "report": ({"core", "spec", "tracking.tags", "report"}, {"ray", "torch"}),  # pandas loads pyarrow
    "sweep": ({"core", "spec", "data", "distill", "tracking", "report", "sweep"}, set()),
    "cli": ({"core", "spec", "data", "distill", "tracking", "report", "sweep", "cli"}, set()),
}
CORE = {"errors", "files"}


def _layer(module: str) -> str:
    """``kd_tune.distill.train`` -> ``distill``; the top-level modules are the core."""
    part = module.split(".")[1]
    return "core" if part in CORE else part


def _modules(layer: str) -> list[str]:
    files = [PACKAGE / f"{m}.py" for m in CORE] if layer == "core" else sorted((PACKAGE / layer).rglob("*.py"))
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
    assert top == CORE
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(RULES) - {"core"}


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
