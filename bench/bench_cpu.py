"""CPU benchmarks: fastbn against its peers and the memory roofline (see conftest.py for the command).

The matrix, the inputs and the implementations come from fastbn/tools/cases.py, the
same table ``python -m fastbn bench`` reports from, so the two never disagree
about what is measured: fastbn and each peer (NumPy, PyTorch, JAX, Flax,
TensorFlow; a peer not installed is skipped, with the reason), the default
shapes including one per layout beyond the last-level cache.  Each benchmark
records in ``extra_info`` the minimal traffic of its operation (in tensor
passes and bytes) so that GB/s and the fraction of the roofline can be read
off the copy benchmarks of the same group: the three copies of
fastbn/tools/roofline.py (one-thread ``np.copyto``, all-core ordinary and
non-temporal stores), whose fastest is the roofline.
"""

from __future__ import annotations

import functools

import pytest

from fastbn.backends.cpu.machine import machine, memory_bytes
from fastbn.tools import bench, cases, peers

SHAPES = cases.default_shapes(machine().l3_bytes, memory_bytes())
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


@pytest.mark.parametrize("library", ["fastbn", *cases.PEERS])
def test_operation(benchmark, case, library):
    if library != "fastbn":
        installed, why = peers.status(library)
        if not installed:
            pytest.skip(f"{cases.LIBRARY_NAMES[library]} is absent: {why}")
    data = _data(case)
    function = cases.LIBRARIES[library](case.operation, data)
    if function is None:
        pytest.skip(f"{cases.LIBRARY_NAMES[library]} has no counterpart of {case.operation}")
    benchmark.group = _group(case)
    benchmark.pedantic(function, rounds=ROUNDS, warmup_rounds=WARMUP)
    passes = cases.minimal_passes(case, machine().core_cache_bytes)
    benchmark.extra_info.update(
        {"library": library, "min_passes": passes, "min_bytes": passes * data.nbytes, "tensor_bytes": data.nbytes}
    )


@pytest.mark.parametrize("kernel", range(3), ids=["np.copyto", "prange-copy", "non-temporal-copy"])
def test_roofline_copy(benchmark, case, kernel):
    """The three copies of fastbn/tools/roofline.py on the tensor: the fastest is the roofline (read + write)."""
    import numpy as np

    from fastbn.tools import roofline

    data = _data(case)
    src, dst = data.x.reshape(-1).view(np.uint8), data.copy_target.reshape(-1).view(np.uint8)
    copies = (np.copyto, roofline.parallel_copy, roofline.parallel_stream_copy)
    function = functools.partial(copies[kernel], dst, src)
    benchmark.group = _group(case)
    benchmark.pedantic(function, rounds=ROUNDS, warmup_rounds=WARMUP)
    passes = cases.minimal_passes(case, machine().core_cache_bytes)
    # roofline time = passes / 2 * the fastest copy's time (a copy moves 2 tensor passes)
    benchmark.extra_info.update({"library": roofline.COPIES[kernel], "copy_passes": 2, "operation_min_passes": passes})


def test_compile_time(benchmark):
    """First call of every operation (compiles its kernels) in a fresh interpreter with an empty cache."""
    result = {}

    def cold_start():
        result.update(bench.measure_compile_time())

    benchmark.group = "compile time"
    benchmark.pedantic(cold_start, rounds=1, iterations=1)
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update(dict(result.items()))
