"""The package's shape: no import cycle, modules of a readable size, tools the library never imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastbn

PACKAGE = Path(fastbn.__file__).resolve().parent
MAX_LINES = 700


def _modules():
    """{module name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path, name, modules):
    """The package's modules that ``path`` imports, anywhere in it (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 30  # the walk saw the package


def test_library_never_imports_the_tools():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("fastbn.tools") and name != "fastbn.__main__":
            tools = {target for target in _imports(path, name, modules) if target.startswith("fastbn.tools")}
            assert not tools, f"{name} imports {tools}"


def test_modules_are_at_most_700_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_a_call_imports_no_tool():
    code = (
        "import sys, numpy as np, fastbn\n"
        "y, saved = fastbn.forward(np.ones((4, 3), np.float32))\n"
        "fastbn.backward(np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), None, saved)\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastbn.tools')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _methods(protocol):
    return [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]


def test_cpu_backend_implements_the_protocols_with_their_signatures():
    """Mirrors tests/cuda's check: every method of Backend (and of SyncPieces, which only the CPU has yet)
    has the protocol's exact signature, so _api can call either backend the same way."""
    import inspect

    from fastbn.backends import Backend, SyncPieces, load
    from fastbn.backends.cpu.ops import BACKEND

    assert load("cpu") is BACKEND and BACKEND.name == "cpu" and SyncPieces in type(BACKEND.sync).__mro__
    for protocol, implementation in ((Backend, type(BACKEND)), (SyncPieces, type(BACKEND.sync))):
        methods = _methods(protocol)
        assert methods
        for name in methods:
            expected = inspect.signature(getattr(protocol, name))
            got = inspect.signature(getattr(implementation, name))
            assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
                (p.name, p.kind, p.default) for p in expected.parameters.values()
            ], name


def test_kernel_cache_is_keyed_on_every_backend_source():
    """A kernel's disk-cache stamp is the hash of all of the CPU backend's sources (see jit.py), so an
    edited helper in another file invalidates it."""
    from fastbn.backends.cpu import jit, reductions

    assert reductions.stats_rows._cache._cache_file._source_stamp == jit._backend_sources_hash()
