"""The package's shape (docs/architecture.md): layers import one way, no import circles, short functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dtop"

# Layers, lowest first: a module may import its own package and any layer below it, never one above.
LAYERS = [
    {"dtop.errors", "dtop._version"},
    {"dtop.checkpoint", "dtop.config", "dtop.jsonio", "dtop.pruning", "dtop.data", "dtop.viz"},
    {"dtop.weights"},
    {"dtop.models"},
    {"dtop.flops", "dtop.convert"},
    {"dtop.engine"},
    {"dtop.apps"},
    {"dtop.cli"},
    {"dtop", "dtop.__main__"},
]
MAX_LINES = 60
EXEMPT = {"add_arguments", "add_flops_arguments", "build_parser"}  # argument-parser construction


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dtop modules ``name`` imports anywhere in its file (function-level imports included): the module
    itself and, for ``from X import y``, the submodule ``X.y`` where there is one."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dtop"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dtop":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer's package) of a module: the longest listed prefix."""
    best = (-1, "")
    for i, layer in enumerate(LAYERS):
        for pkg in layer:
            if (name == pkg or name.startswith(pkg + ".") or pkg == "dtop") and len(pkg) > len(best[1]):
                best = (i, pkg)
    return best


def test_every_module_has_a_layer():
    assert all(layer_of(m)[0] >= 0 for m in modules())


def test_layers_import_one_way():
    wrong = []
    for src, targets in graph().items():
        ls, ps = layer_of(src)
        for dst in targets:
            ld, pd = layer_of(dst)
            if ld > ls or (ld == ls and pd != ps):
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("low,high", [("dtop.pruning", "dtop.models"), ("dtop.engine", "dtop.viz"),
                                      ("dtop.engine", "dtop.apps"), ("dtop.viz", "dtop.engine"),
                                      ("dtop.viz", "dtop.models"), ("dtop.models", "dtop.flops"),
                                      ("dtop.checkpoint", "dtop.models")])
def test_named_rules(low, high):
    """The rules the issue names, spelled out (the layer test implies them)."""
    bad = [f"{s} -> {d}" for s, ts in graph().items() if s == low or s.startswith(low + ".")
           for d in ts if d == high or d.startswith(high + ".")]
    assert not bad


def test_checkpoint_imports_only_the_errors():
    assert graph()["dtop.checkpoint"] <= {"dtop.errors"}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with models -> flops -> models is caught."""
    pkg = tmp_path / "dtop"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from ..flops import count\n")
    (pkg / "flops.py").write_text("from .models import thing\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    g = graph()
    assert g["dtop.models"] == {"dtop.flops"} and g["dtop.flops"] == {"dtop.models"}
    with pytest.raises(AssertionError, match="dtop.models -> dtop.flops"):
        test_layers_import_one_way()
    with pytest.raises(AssertionError):
        test_no_import_cycles()


def functions():
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_functions_are_short():
    long = [f"{m}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for m, f in functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES and f.name not in EXEMPT]
    assert not long, "\n".join(long)


def test_dtop_forward_reads_in_one_screen():
    tree = ast.parse((PACKAGE / "models" / "segmentor.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DToPSegmentor")
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert forward.end_lineno - forward.lineno + 1 <= 40
