"""The package layout keeps its promises: small modules, no import loops, no private names
reached across modules (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stelab"
MAX_LINES = 550


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path, *, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for each stelab import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod == "stelab" or mod.startswith("stelab."):
                out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("stelab")]
    return out


def test_no_module_is_too_long() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_no_private_name_is_imported_across_modules() -> None:
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path, top_level_only=False):
            for n in names:
                target = f"{mod}.{n}"
                if (
                    n.startswith("_")
                    and not n.startswith("__")
                    and target not in MODULES
                    and mod != name
                ):
                    bad.append(f"{name} imports {mod}.{n}")
    assert bad == []


def test_module_level_imports_have_no_cycles() -> None:
    graph: dict[str, set[str]] = {n: set() for n in MODULES}
    for name, path in MODULES.items():
        for mod, names in _imports(name, path, top_level_only=True):
            for target in [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES] or [mod]:
                # importing a package runs its __init__, not its submodules
                if target in MODULES and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    cycles, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join([*stack[stack.index(m) :], m]))
            elif m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_loading_a_checkpoint_does_not_need_the_training_loop() -> None:
    """``stelab.train.checkpoint`` (used by export, gradcheck and report) imports nothing
    of the loop, not even inside a function."""
    name = "stelab.train.checkpoint"
    mods = [m for m, _ in _imports(name, MODULES[name], top_level_only=False)]
    assert "stelab.train.loop" not in mods and mods  # it does import other stelab modules


@pytest.mark.parametrize(
    "core",
    [
        "errors",
        "registry",
        "estimators",
        "halfnormal",
        "quantizers",
        "specs",
        "nn",
        "models",
        "sbn",
    ],
)
def test_the_core_depends_on_torch_only(core: str) -> None:
    allowed = {"torch", "__future__", "math", "typing", "collections", "dataclasses",
               "functools", "itertools", "warnings", "inspect", "difflib", "weakref",
               "contextlib", "enum", "abc", "operator", "numbers", "re", "types", "os",
               "threading", "sys", "importlib", "copy", "fnmatch"}  # fmt: skip
    bad = []
    for name, path in MODULES.items():
        if name == f"stelab.{core}" or name.startswith(f"stelab.{core}."):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    mods = [node.module]
                top = [m for m in mods if not m.startswith("stelab")]
                bad += [f"{name}: {m}" for m in top if m.split(".")[0] not in allowed]
    assert bad == []
