"""Fused forms against separate calls, with pytest-benchmark.

The same callables as ``python -m fastbn bench-fused`` (fastbn/tools/bench_fused.py):
for each variant and shape, the group holds the fused call, the separate calls
doing the same work, and the np.copyto that gives the time of one tensor pass.
Run with ``python -m pytest bench/bench_fused.py --benchmark-only -p no:cacheprovider``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastbn.backends.cpu.machine import machine
from fastbn.tools import bench_fused, cases

SHAPES = [cases.parse_shape(spec) for spec in bench_fused.DEFAULT_SHAPES]
WORK = [("forward", v) for v in bench_fused.VARIANTS] + [("backward", v) for v in bench_fused.BACKWARD_VARIANTS]
ROUNDS = 15
WARMUP = 3
_inputs = {}


def _data(shape):
    if shape not in _inputs:
        _inputs.clear()
        _inputs[shape] = bench_fused._inputs(shape)
    return _inputs[shape]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
@pytest.mark.parametrize("direction, variant", WORK, ids=[f"{d}-{v}" for d, v in WORK])
@pytest.mark.parametrize("form", ["fused", "separate"])
def test_fused_against_separate(benchmark, shape, direction, variant, form):
    if variant == "ghost" and shape.dims[0] % bench_fused.GHOST_BATCH:
        pytest.skip("the batch is not a multiple of the ghost batch size")
    data = _data(shape)
    function = bench_fused.callables(direction, variant, data)[form]
    benchmark.group = f"{direction} {variant} {shape.label}"
    benchmark.pedantic(function, rounds=ROUNDS, warmup_rounds=WARMUP)
    fused, separate = bench_fused.passes(direction, variant, cases.channel_bytes(shape, 4), machine().core_cache_bytes)
    benchmark.extra_info.update({"form": form, "min_passes": fused if form == "fused" else separate})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
def test_one_tensor_pass(benchmark, shape):
    """np.copyto into an existing array: two tensor passes (read and write)."""
    data = _data(shape)
    benchmark.group = f"copy {shape.label}"
    benchmark.pedantic(np.copyto, args=(data.copy_target, data.x), rounds=ROUNDS, warmup_rounds=WARMUP)
