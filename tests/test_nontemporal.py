"""Non-temporal output stores (fastbn.backends.cpu.nontemporal): every element lands, at any alignment, and the
kernels write bit-for-bit the same outputs whether they stream them around the cache or store them
normally.  The benchmark matrix's outputs all take the streaming path; these tests force it on small
tensors so that every layout, dtype, option and partial cache line is covered quickly."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastbn
from fastbn.backends.cpu import plan
from fastbn.backends.cpu.nontemporal import stream_copy

from oracle import assert_plans_agree

LENGTHS = (0, 1, 3, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 257, 1000)


@numba.njit
def _copy(dst, src):
    stream_copy(dst, src)


# uint16 and int16: the element types the kernels see for float16 and bfloat16.
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32, np.float64])
def test_stream_copy_writes_exactly_the_destination_at_every_offset(dtype):
    rng = np.random.default_rng(0)
    per_line = 64 // np.dtype(dtype).itemsize
    for offset in range(per_line + 1):
        for n in LENGTHS:
            buffer = np.full(offset + n + per_line + 1, 7, dtype)
            src = rng.integers(100, 1000, n + 3).astype(dtype)  # longer than dst: only len(dst) is copied
            _copy(buffer[offset : offset + n], src)
            assert np.array_equal(buffer[offset : offset + n], src[:n]), (offset, n)
            assert (buffer[:offset] == 7).all() and (buffer[offset + n :] == 7).all(), (offset, n)


def test_stream_copy_on_an_address_that_is_not_element_aligned():
    """No aligned vector store is possible there: every element is stored one by one instead of faulting."""
    raw = np.zeros(4 * 300 + 1, np.uint8)
    dst = np.frombuffer(raw.data, dtype=np.float32, count=300, offset=1)
    assert dst.ctypes.data % 4 != 0
    src = np.arange(300, dtype=np.float32)
    _copy(dst, src)
    assert np.array_equal(dst, src)


def test_large_outputs_stream_and_small_ones_do_not():
    threshold = plan.nontemporal_bytes(plan.machine())
    assert plan.choose("normalize", plan.SLAB, (1, 1, threshold // 4), 4).nontemporal
    assert not plan.choose("normalize", plan.SLAB, (1, 1, threshold // 4 - 1), 4).nontemporal
    assert not plan.choose("moments", plan.SLAB, (1, 1, threshold), 4).nontemporal  # writes no output


# Shapes with runs shorter and longer than a scratch chunk (2048 elements), tasks of several chunks,
# channels last, one channel, and ghost batches; every dtype on the plain forms, float32 (whose
# kernels the other dtypes share but for the element loads and stores) on the fused ones, to keep
# compilation short.
ALL = (np.float16, np.float32, np.float64)
CASES = [
    *(((3, 5, 7, 11), 1, {}, dtype) for dtype in ALL),
    *(((600, 70), 1, {}, dtype) for dtype in ALL),
    ((4, 6, 2500), 1, {"activation": "relu", "residual": True}, np.float32),
    ((2, 3, 40, 60), 1, {"residual": True}, np.float32),
    ((5, 7, 7, 33), -1, {"activation": "relu", "residual": True}, np.float32),
    ((5000, 1), 1, {}, np.float32),
    ((8, 4, 30, 30), 1, {"virtual_batch_size": 2, "activation": "relu"}, np.float32),
]


def _run(shape, axis, dtype, options, nontemporal):
    forced = {"_plan": {"nontemporal": nontemporal}}
    rng = np.random.default_rng(1)
    params = np.float32 if dtype == np.float16 else dtype
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    weight = rng.standard_normal(channels).astype(params)
    bias = rng.standard_normal(channels).astype(params)
    options = dict(options)
    if options.get("residual"):
        options["residual"] = rng.standard_normal(shape).astype(dtype)
    else:
        options.pop("residual", None)
    running = (
        {}
        if "virtual_batch_size" in options
        else {"running_mean": np.zeros(channels, params), "running_var": np.ones(channels, params)}
    )
    y, saved = fastbn.forward(x, weight, bias, training=True, axis=axis, backend="cpu", **running, **options, **forced)
    dy = rng.standard_normal(shape).astype(dtype)
    grads = fastbn.backward(
        dy, x, weight, saved, axis=axis, backend="cpu", y=y if options.get("activation") else None, **forced
    )
    outputs = [y, *grads]
    if "virtual_batch_size" not in options:
        outputs.append(
            fastbn.forward(
                x,
                weight,
                bias,
                training=False,
                axis=axis,
                backend="cpu",
                **running,
                **{k: v for k, v in options.items() if k != "virtual_batch_size"},
                **forced,
            )[0]
        )
    return outputs


@pytest.mark.parametrize("shape,axis,options,dtype", CASES)
def test_streamed_outputs_equal_ordinary_stores_bit_for_bit(shape, axis, options, dtype):
    ordinary = _run(shape, axis, dtype, options, False)
    streamed = _run(shape, axis, dtype, options, True)
    assert len(ordinary) == len(streamed)
    for a, b in zip(ordinary, streamed):
        assert_plans_agree(a, b, dtype)
