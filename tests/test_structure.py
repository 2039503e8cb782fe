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


def _decorated_kernels():
    """(path, FunctionDef) of every function of the CPU backend decorated ``@kernel`` or ``@kernel(...)``."""
    for path in sorted((PACKAGE / "backends" / "cpu").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                (isinstance(d, ast.Name) and d.id == "kernel")
                or (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "kernel")
                for d in node.decorator_list
            ):
                yield path, node


def _handed_on(func):
    """The parameters of ``func`` that a prange body subscripts or passes to a call, in parameter order."""
    used = set()
    for loop in ast.walk(func):
        if (
            isinstance(loop, ast.For)
            and isinstance(loop.iter, ast.Call)
            and getattr(loop.iter.func, "id", "") == "prange"
        ):
            for node in ast.walk(loop):
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
                    used.add(node.value.id)
                elif isinstance(node, ast.Call):
                    used.update(a.id for a in node.args if isinstance(a, ast.Name))
    return [a.arg for a in func.args.args if a.arg in used]


def test_every_kernel_borrows_what_its_prange_bodies_use_first():
    """jit.borrowed's rule: a kernel's first statements (after its docstring) rebind, one per line and in
    parameter order, each parameter that a prange body views or hands on, to its borrowed copy, so that
    no view in the parallel loops updates a reference count the threads share."""
    kernels = [(path, func, _handed_on(func)) for path, func in _decorated_kernels()]
    assert sum(bool(names) for _, _, names in kernels) >= 15, kernels
    for path, func, names in kernels:
        body = func.body[1:] if isinstance(func.body[0], ast.Expr) else func.body
        lead = []
        for stmt in body:
            call = stmt.value if isinstance(stmt, ast.Assign) else None
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "borrowed"):
                break
            assert [t.id for t in stmt.targets] == [a.id for a in call.args], f"{path.name}:{func.name}"
            lead.append(call.args[0].id)
        assert lead == names, f"{path.name}:{func.name}"


def test_a_borrowed_allocation_is_kept_alive_past_its_views():
    """Anywhere in the CPU backend, ``borrowed`` of a name that is not a parameter of the enclosing
    function (an array the function allocated) is followed, in the same block, by ``kept`` of it: without
    the owner's later use, Numba could free the buffer while the borrowed views still read it."""
    checked = 0
    for path in sorted((PACKAGE / "backends" / "cpu").glob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef):
                continue
            params = {a.arg for a in func.args.args}
            for block in ast.walk(func):
                stmts = getattr(block, "body", None)
                if not isinstance(stmts, list):
                    continue
                for i, stmt in enumerate(stmts):
                    if not isinstance(stmt, (ast.Assign, ast.Expr)):
                        continue  # a compound statement's calls are checked in its own block
                    for call in ast.walk(stmt):
                        if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "borrowed"):
                            continue
                        for arg in call.args:
                            assert isinstance(arg, ast.Name), f"{path.name}:{func.name}"
                            if arg.id in params:
                                continue
                            later = [
                                c
                                for s in stmts[i + 1 :]
                                for c in ast.walk(s)
                                if isinstance(c, ast.Call)
                                and getattr(c.func, "id", None) == "kept"
                                and [a.id for a in c.args if isinstance(a, ast.Name)] == [arg.id]
                            ]
                            assert later, f"{path.name}:{func.name}: borrowed({arg.id}) is never kept"
                            checked += 1
    assert checked >= 1  # the streamed SLAB statistics borrow their per-piece scratch
