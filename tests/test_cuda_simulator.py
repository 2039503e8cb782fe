"""The GPU tests, run under Numba's CUDA simulator; and fastbn without any CUDA package.

NUMBA_ENABLE_CUDASIM=1 only takes effect if it is set before Numba is first
imported, which this pytest process has long done; so the GPU tests
(tests/cuda) run in a pytest of their own, started here with the variable
set.  This test fails, showing that run's output, if any GPU test fails or if
none was collected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Two halves of tests/cuda, each in a pytest of its own, so that a parallel run
# (pytest -n) can put them on different cores: the simulator is slow.
SIMULATOR_PARTS = {
    "fused": ["tests/cuda/test_cuda_fused.py"],
    "core": ["tests/cuda", "--ignore=tests/cuda/test_cuda_fused.py"],
}


@pytest.mark.parametrize("part", sorted(SIMULATOR_PARTS))
def test_gpu_tests_pass_under_the_cuda_simulator(part):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    command = [sys.executable, "-m", "pytest", *SIMULATOR_PARTS[part], "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output[-20000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no GPU test ran:\n{output[-5000:]}"
    assert not re.search(r"skipped|xfail|deselected", summary), f"GPU tests were left out: {summary}"


_WITHOUT_NUMBA_CUDA = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoCuda(importlib.abc.MetaPathFinder):
        # As if no CUDA target were installed: numba.cuda and its submodules cannot be imported.
        def find_spec(self, name, path=None, target=None):
            if name == "numba.cuda" or name.startswith("numba.cuda."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoCuda())

    import numpy as np
    import fastbn

    x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv)
    dx, dweight, dbias = fastbn.backward(np.ones_like(x), x, None, saved)
    mean, var = fastbn.moments(x)
    fastbn.normalize(x, mean, var)
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(dbias, x.size / 3)
    assert not any(name == "numba.cuda" or name.startswith("numba.cuda.") for name in sys.modules)

    class ForeignGPUArray:  # a GPU array as CuPy or torch would give
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False), "version": 3}
        shape, dtype = (4, 3), np.dtype(np.float32)

    try:
        fastbn.forward(ForeignGPUArray())
    except ValueError as exc:
        assert str(exc).startswith("backend: the CUDA backend is not available"), exc
    else:
        raise AssertionError("a GPU array without a CUDA target was accepted")
    print("ok")
    """
)


def test_cpu_use_needs_no_cuda_package():
    """``import fastbn`` and every CPU call work when numba.cuda cannot be imported; a GPU
    array then gets a clear error."""
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_NUMBA_CUDA], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_cpu_use_imports_no_cuda_package():
    script = (
        "import sys, numpy as np, fastbn; fastbn.forward(np.ones((4, 3), np.float32)); "
        "print(sorted(m for m in sys.modules if m == 'numba.cuda' or m.startswith(('numba.cuda.', 'cuda.'))))"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
