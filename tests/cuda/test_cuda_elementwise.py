"""The elementwise kernels' walks, launched directly: both cuts of the array into runs (across rows, along a
channel), rows longer than the threads, ghost batch groups, every option variant, and the unrolled and remainder
loops of each; and ``gather``'s unrolled loop.  The launch sizes are conftest's small ones (32 threads a block,
at most 2 blocks), so that tiny arrays take every path."""

from __future__ import annotations

import numpy as np
import pytest

from fastbn.backends.cuda import plan, target
from fastbn.backends.cuda.elementwise import unroll
from fastbn.backends.cuda.numerics import accumulator

DTYPES = (np.float16, np.float32, np.float64)

# (outer, channels, inner, groups), with the cut and the case each takes under conftest's launch sizes.
SHAPES = [
    pytest.param((40, 3, 1, 1), id="rows-small-C"),  # across rows, period several rows, unrolled loop
    pytest.param((9, 70, 1, 1), id="rows-long"),  # a row longer than the 64 x threads: they walk its positions
    pytest.param((24, 2, 5, 1), id="slab-across-rows"),
    pytest.param((24, 3, 7, 4), id="slab-ghost-groups"),  # one y block per group
    pytest.param((32, 5, 1, 8), id="rows-ghost-groups"),
    pytest.param((2, 3, 700, 1), id="slab-along-channel"),  # too few rows: runs along each channel's inner
    pytest.param((2, 2, 320, 2), id="slab-along-channel-groups"),
    pytest.param((1, 3, 5, 1), id="tiny"),  # remainder loops only
]


def _virtual_channels(outer, channels, inner, groups):
    """The virtual channel g C + c of every flat index, as the kernels must find it."""
    e = np.arange(outer * channels * inner)
    return (e // (e.size // groups)) * channels + (e // inner) % channels


def _tolerance(dtype):
    return {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]  # room for a GPU's fused multiply-adds


def _device(array):
    return target.cuda.to_device(np.ascontiguousarray(array))


def _walk(launches, name):
    """The (grid, slab, period) of the one launch of ``name``."""
    found = [(grid, args) for launched, grid, _, args in launches if launched == name]
    assert len(found) == 1, [launched for launched, *_ in launches]
    grid, args = found[0]
    return grid, args[-6 if name.startswith("normalize") else -8], args[-5 if name.startswith("normalize") else -7]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu, residual", [(False, False), (True, True)], ids=["plain", "residual-relu"])
def test_normalize_walks(shape, dtype, relu, residual, launches):
    outer, channels, inner, groups = shape
    rng = np.random.default_rng(sum(shape))
    acc = accumulator(np.dtype(dtype))
    stat = np.dtype(acc)
    x = rng.normal(size=outer * channels * inner).astype(dtype)
    z = rng.normal(size=x.size).astype(dtype)
    mean, scale, shift = (rng.normal(size=groups * channels).astype(stat) for _ in range(3))
    y = _device(np.full(x.size, np.nan, dtype))
    plan.normalize_flat(
        _device(x),
        _device(z),
        channels,
        inner,
        groups,
        _device(mean),
        _device(scale),
        _device(shift),
        y,
        relu=relu,
        residual=residual,
    )
    v = _virtual_channels(*shape)
    expected = (x.astype(acc) - mean[v]) * scale[v] + shift[v]
    if residual:
        expected += z.astype(acc)
    if relu:
        expected = np.where(expected < 0, acc(0), expected)
    np.testing.assert_allclose(
        y.copy_to_host().astype(acc), expected.astype(dtype).astype(acc), rtol=_tolerance(dtype), atol=_tolerance(dtype)
    )
    grid, slab, period = _walk(launches, "normalize" + ("_residual_relu" if relu else ""))
    group_size = x.size // groups
    if inner >= plan.THREADS_PER_BLOCK and group_size // (channels * inner) < unroll(dtype):
        assert slab == inner and period == grid[0] * plan.THREADS_PER_BLOCK, (grid, slab, period)  # along a channel
    else:
        assert slab == group_size and period % (channels * inner) == 0 and grid[1] == groups, (grid, slab, period)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked, write_dres", [(False, False), (True, True)], ids=["plain", "masked-dres"])
def test_backward_elementwise_walks(shape, dtype, masked, write_dres, launches):
    outer, channels, inner, groups = shape
    rng = np.random.default_rng(100 + sum(shape))
    acc = accumulator(np.dtype(dtype))
    stat = np.dtype(acc)
    dy, x, y = (rng.normal(size=outer * channels * inner).astype(dtype) for _ in range(3))
    mean, mean_dy, k, scale = (rng.normal(size=groups * channels).astype(stat) for _ in range(4))
    k[0] = 0  # eval's k: x does not matter in that channel, NaN included
    x[_virtual_channels(*shape) == 0] = np.nan
    dx = _device(np.full(x.size, np.nan, dtype))
    dres = _device(np.full(x.size, np.nan, dtype))
    plan.backward_elementwise_flat(
        _device(dy),
        _device(x),
        _device(y),
        channels,
        inner,
        groups,
        _device(mean),
        _device(mean_dy),
        _device(k),
        _device(scale),
        dx,
        dres,
        masked=masked,
        write_dres=write_dres,
    )
    v = _virtual_channels(*shape)
    grad = dy.astype(acc)
    if masked:
        grad = np.where(y.astype(acc) > 0, grad, acc(0))
    with np.errstate(invalid="ignore"):
        centred_k = np.where(k[v] == 0, acc(0), (x.astype(acc) - mean[v]) * k[v])
    expected = (grad - mean_dy[v] - centred_k) * scale[v]
    tol = _tolerance(dtype)
    np.testing.assert_allclose(dx.copy_to_host().astype(acc), expected.astype(dtype).astype(acc), rtol=tol, atol=tol)
    if write_dres:
        np.testing.assert_array_equal(dres.copy_to_host(), grad.astype(dtype))
    else:
        assert np.isnan(dres.copy_to_host()).all()  # never written
    _walk(launches, "backward_elementwise" + ("_masked_dres" if masked else ""))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gather_unrolled_and_remainder(dtype, launches):
    """A transposed, reversed array of 1000 elements: its threads take 4 elements an iteration, then the rest."""
    source = np.arange(1200).astype(dtype)
    shape, strides = (10, 4, 25), (-4, 1, 40)  # element [i, j, l] is source[36 + 40 l + j - 4 i]
    start = 36
    destination = _device(np.zeros(1000, dtype))
    pad = plan.GATHER_RANK - len(shape)
    plan.gather_flat(_device(source), start, (1,) * pad + shape, (0,) * pad + strides, destination)
    i, j, m = np.indices(shape)
    np.testing.assert_array_equal(destination.copy_to_host(), source[start - 4 * i + j + 40 * m].ravel())
    (grid,) = [grid for name, grid, *_ in launches if name == "gather"]
    assert 4 * grid * plan.THREADS_PER_BLOCK < 1000, grid  # the unrolled loop runs


def test_walk_shapes(small_launches):
    """The launch's cut for representative shapes at the real launch sizes: across rows (a thread two iterations
    of its rows, at most the x threads' worth of rows in a period, a long row walked by them), along a channel."""
    small_launches.THREADS_PER_BLOCK = 256
    small_launches.MAX_ELEMENTWISE_BLOCKS = 8192
    grid, block, slab, period = plan._elementwise_grid(32 * 64 * 3136, 64, 3136, 1, 4)
    assert (slab, period, block) == (32 * 64 * 3136, 4 * 64 * 3136, 256) and grid == (3136, 1)
    grid, _, slab, period = plan._elementwise_grid(2 * 64 * 50176, 64, 50176, 1, 4)
    assert (slab, period) == (50176, grid[0] * 256) and grid == (25, 128)  # one image per group: along channels
    grid, _, slab, period = plan._elementwise_grid(16 * 64 * 50176, 64, 50176, 1, 4)
    assert (slab, period) == (16 * 64 * 50176, 64 * 50176) and grid == (plan.MAX_ELEMENTWISE_BLOCKS, 1)
    grid, _, slab, period = plan._elementwise_grid(8 * 128 * 1000, 1000, 1, 8, 8)
    assert (slab, period) == (128 * 1000, 8 * 1000) and grid == (32, 8)  # ROWS, ghost groups: a y block each
    with pytest.raises(ValueError, match="at most"):
        plan._elementwise_grid(1 << 48, 1, 1)
