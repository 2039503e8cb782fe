"""numba-cuda-mlir, numba-cuda's successor, as fastbn's CUDA target (FASTBN_CUDA_TARGET=numba-cuda-mlir).

The target is chosen once, when fastbn.backends.cuda.target is first
imported, so each check runs in a child interpreter of its own.  No GPU is
needed: every kernel of the backend's table is compiled to PTX, as
``python -m fastbn ptx`` does with numba-cuda, for float16 and float32 (the
two unroll widths of the elementwise kernels).  float64 runs the float32
code with float64 accumulation; ``FASTBN_CUDA_TARGET=numba-cuda-mlir python
-m fastbn ptx --cc 9.0`` compiles all three (it did, 60 of 60, on the
kernels of this commit), at twice this test's cost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_MLIR = importlib.util.find_spec("numba_cuda_mlir") is not None


def _child(code, target, timeout=600):
    env = dict(os.environ, FASTBN_CUDA_TARGET=target)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_COMPILE_ALL = """
    import json
    import numpy as np
    from fastbn.backends.cuda import plan, target

    compiled, failed = [], {}
    for dtype in (np.float16, np.float32):  # float64: the same code with float64 accumulation (see the docstring)
        for name, dispatcher, argtypes in plan.signatures(dtype):
            try:
                ptx = target.compile_ptx(dispatcher.py_func, argtypes, (9, 0))
                assert ".entry" in ptx and ".target sm_90" in ptx, name
                compiled.append(name)
            except Exception as exc:
                failed[f"{name} {np.dtype(dtype).name}"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(dict(name=target.NAME, module=type(plan.signatures(np.float32)[0][1]).__module__,
                          compiled=len(compiled), total=2 * len(plan.signatures(np.float32)), failed=failed)))
"""


@pytest.mark.skipif(not HAS_MLIR, reason="needs numba-cuda-mlir (pip install 'fastbn[mlir]')")
def test_every_kernel_compiles_with_numba_cuda_mlir():
    proc = _child(_COMPILE_ALL, "numba-cuda-mlir")
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "numba-cuda-mlir" and out["module"].startswith("numba_cuda_mlir"), out
    assert out["failed"] == {} and out["compiled"] == out["total"], out


def test_an_unknown_target_is_refused_naming_the_variable():
    proc = _child("import fastbn.backends.cuda.target", "numba-cuda-llvm")
    assert proc.returncode != 0
    assert (
        "ValueError: FASTBN_CUDA_TARGET: expected one of numba-cuda, numba-cuda-mlir, got 'numba-cuda-llvm'"
        in proc.stderr
    ), proc.stderr[-3000:]


def test_without_numba_cuda_mlir_the_error_names_the_extra():
    code = """
        import importlib.abc, sys

        class NoMlir(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "numba_cuda_mlir" or name.startswith("numba_cuda_mlir."):
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
                return None

        sys.meta_path.insert(0, NoMlir())
        try:
            import fastbn.backends.cuda.target
        except ModuleNotFoundError as exc:
            print(type(exc).__name__, exc)
        """
    proc = _child(code, "numba-cuda-mlir")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MissingDependency" in proc.stdout and "fastbn[mlir]" in proc.stdout, proc.stdout
