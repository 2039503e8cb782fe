"""CPU benchmarks: fastbn against NumPy, PyTorch and the memory roofline (see conftest.py for the command).

The matrix, the inputs and the implementations come from fastbn/tools/cases.py, the
same table ``python -m fastbn bench`` reports from, so the two never disagree
about what is measured.  Each fastbn benchmark records in ``extra_info`` the
minimal DRAM traffic of its operation (in tensor passes and bytes) so that
GB/s and the fraction of the roofline can be read off the copy benchmark of the
same group.
"""

from __future__ import annotations

import pytest

from fastbn.backends.cpu.machine import machine
from fastbn.tools import bench, cases

SHAPES = [cases.parse_shape(spec) for spec in cases.DEFAULT_SHAPES]
CASES = cases.build_cases(cases.OPERATIONS, SHAPES, cases.DTYPES)
ROUNDS = 15
WARMUP = 3

_inputs = {}


def _data(case):
    """Inputs shared by every benchmark of a shape and dtype (one set alive at a time)."""
    key = (case.shape, case.dtype)
    if key not in _inputs:
        _inputs.clear()
        _inputs[key] = cases.Inputs(case.shape, case.dtype)
    return _inputs[key]


def _group(case):
    return f"{case.operation} {case.shape.label} {case.dtype}"


@pytest.fixture(params=CASES, ids=lambda case: case.label.replace(" ", "-"))
def case(request):
    return request.param


@pytest.mark.parametrize("library", ["fastbn", "numpy", "torch"])
def test_operation(benchmark, case, library):
    if library == "torch":
        pytest.importorskip("torch")
    data = _data(case)
    function = cases.LIBRARIES[library](case.operation, data)
    benchmark.group = _group(case)
    benchmark.pedantic(function, rounds=ROUNDS, warmup_rounds=WARMUP)
    passes = cases.minimal_passes(case, machine().core_cache_bytes)
    benchmark.extra_info.update(
        {"library": library, "min_passes": passes, "min_bytes": passes * data.nbytes, "tensor_bytes": data.nbytes}
    )


def test_roofline_copy(benchmark, case):
    """np.copyto into an existing array: the bandwidth the roofline is measured at (read + write)."""
    import numpy as np

    data = _data(case)
    benchmark.group = _group(case)
    benchmark.pedantic(np.copyto, args=(data.copy_target, data.x), rounds=ROUNDS, warmup_rounds=WARMUP)
    passes = cases.minimal_passes(case, machine().core_cache_bytes)
    # roofline time = passes / 2 * this benchmark's time (a copy moves 2 tensor passes)
    benchmark.extra_info.update({"library": "np.copyto", "copy_passes": 2, "operation_min_passes": passes})


def test_compile_time(benchmark):
    """First call of every operation (compiles its kernels) in a fresh interpreter with an empty cache."""
    result = {}

    def cold_start():
        result.update(bench.measure_compile_time())

    benchmark.group = "compile time"
    benchmark.pedantic(cold_start, rounds=1, iterations=1)
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update(dict(result.items()))
