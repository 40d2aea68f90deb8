"""The package's shape: every module imports on its own, no import cycles, one place for a backward pass.

Data flows config -> data + models -> engine -> parallel -> api / cli, and no package imports one to
its right. A cycle between packages (or between two modules of one package) is what made imports
inside functions necessary; they remain only for optional or heavy dependencies and for the CLI's
lazily loaded subcommands.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnntrain"
LAZY_ALLOWED = {"cli.py"}  # each subcommand imports what it needs when it runs


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(cnntrain modules ``path`` imports anywhere, (line, module) of those imported inside a function)."""
    tree = ast.parse(path.read_text())
    found, lazy = set(), []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n for n in names if n.startswith("cnntrain"))
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnntrain"):
                    lazy.append((node.lineno, node.module))
    return found, lazy


def _graph(level) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path)[0] if t in modules}
        graph.setdefault(level(name), set()).update(level(t) for t in targets if level(t) != level(name))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _package(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# What each package must never reach, directly or through others (data flows left to right).
# A sweep (sweep/) runs trials through the api, so it sits right of it: only the CLI and report reach it.
RIGHT_OF = {"config": {"data", "models", "engine", "parallel", "api", "sweep", "cli"},
            "data": {"models", "engine", "parallel", "api", "sweep", "cli"},
            "models": {"data", "engine", "parallel", "api", "sweep", "cli"},
            "engine": {"parallel", "api", "sweep", "cli"},
            "parallel": {"api", "sweep", "cli"},
            "api": {"sweep", "cli"},
            "sweep": {"cli"}}


def test_no_import_cycle_between_packages_and_data_flows_one_way():
    graph = _graph(_package)
    assert _cycles(graph) == []
    for package, forbidden in RIGHT_OF.items():
        assert _reachable(graph, package) & forbidden == set(), package


def test_no_import_cycle_between_modules():
    assert _cycles(_graph(lambda name: name)) == []


def test_project_imports_inside_functions_only_in_the_cli():
    offenders = {str(path.relative_to(PACKAGE)): lazy for path in PACKAGE.rglob("*.py")
                 if path.name not in LAZY_ALLOWED and (lazy := _imports(path)[1])}
    assert offenders == {}


def test_backward_is_written_once():
    assert [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if ".backward(" in p.read_text()] == \
        ["engine/step.py"]


def _import_alone(name: str) -> None:
    import importlib

    importlib.import_module(name)


@pytest.mark.skipif(sys.platform != "linux", reason="forks a child per module")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in its own process: a module that works only after some other module has
    been imported (an order-dependent cycle) fails here. The children are forked from a parent that
    has loaded the heavy third-party libraries but nothing of cnntrain, so this takes seconds."""
    code = ("import multiprocessing as mp, sys, torch, torchvision, numpy, safetensors, yaml, PIL.Image\n"
            "assert not any(m == 'cnntrain' or m.startswith('cnntrain.') for m in sys.modules)\n"
            "from tests.test_layout import _import_alone\n"
            "ctx = mp.get_context('fork')\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    p = ctx.Process(target=_import_alone, args=(name,)); p.start(); p.join(120)\n"
            "    if p.exitcode != 0: bad.append(name)\n"
            "print('FAILED', ' '.join(bad)) if bad else print('OK')\n")
    names = [name for name in _modules() if not name.endswith("__main__")]  # that one runs the CLI
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout[-2000:] + out.stderr[-3000:]


def test_no_function_in_the_engine_or_parallel_is_longer_than_80_lines():
    long = []
    for folder in ("engine", "parallel"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({n} lines)")
    assert long == []


def test_layout_checks_can_fail():
    """The cycle finder finds a planted cycle (so the tests above are not vacuous)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _reachable({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}
