"""The launch side of the CUDA backend: launch sizes, grids, the reduction plan, the launches.

Launch sizes are module attributes read at every launch, so tests can patch
them small (the CUDA simulator runs a Python thread per CUDA thread) and still
reach the multi-warp and multi-block paths.  ``WARP_SIZE``, ``MAX_THREADS``
and ``GATHER_RANK`` are here too, for reading only: they are compile-time
constants of the kernels (:mod:`fastbn.backends.cuda.numerics`,
:mod:`fastbn.backends.cuda.elementwise`), which a patch here would not
reach.

:func:`signatures` is the table of every kernel the backend launches and its
argument types: ``python -m fastbn ptx`` compiles exactly these, and the
simulator tests check every launch against it.
"""

from __future__ import annotations

import math

import numpy as np

from fastbn.backends.cuda import context
from fastbn.backends.cuda.elementwise import GATHER_RANK, backward_elementwise_kernel, gather, normalize_kernel
from fastbn.backends.cuda.numerics import (
    MAX_THREADS,
    WARP_SIZE,
    accumulator,
    backward_coefficients,
    forward_coefficients,
    normalize_coefficients,
    stats_merge,
    update_running,
)
from fastbn.backends.cuda.reductions import backward_reduce_kernels, stats_kernels
from fastbn.backends.cuda.target import types

__all__ = [
    "GATHER_RANK",
    "ITEMS_PER_THREAD",
    "LAUNCH_LOG",
    "MAX_ELEMENTWISE_BLOCKS",
    "MAX_GROUPS_PER_LAUNCH",
    "MAX_SPLITS",
    "MAX_THREADS",
    "THREADS_PER_BLOCK",
    "WARP_SIZE",
    "ReductionPlan",
    "backward_elementwise_flat",
    "backward_reduce",
    "gather_flat",
    "launch_per_channel",
    "normalize_flat",
    "signatures",
    "stats",
]

# ----------------------------------------------------------- launch sizes ---
#: Threads per block of every kernel; a multiple of the warp size.
THREADS_PER_BLOCK = 256
#: Elements each thread of a reduction accumulates before a channel gets one
#: more block: enough to amortise the block's merge, few enough to fill the GPU.
ITEMS_PER_THREAD = 16
#: At most this many blocks per channel (or channel tile) in a reduction:
#: bounds the partials buffer and keeps gridDim.y under its limit of 65535.
MAX_SPLITS = 1024
#: Grid size of the elementwise kernels; beyond it their grid-stride loops take over.
MAX_ELEMENTWISE_BLOCKS = 8192
#: At most this many ghost-batch groups per reduction launch (gridDim.z's limit
#: is 65535); more groups take several launches.
MAX_GROUPS_PER_LAUNCH = 65535

#: Tests set this to a list to record every launch as (kernel name, grid, block, args).
LAUNCH_LOG = None
#: With LAUNCH_LOG set, the stream of each launch, in the same order.
LAUNCH_STREAMS: list = []


# ------------------------------------------------------------- launching ---
def _name(dispatcher):
    return getattr(dispatcher, "py_func", dispatcher).__name__


def _launch(dispatcher, grid, block, *args):
    """Launch on the current call's stream (:func:`fastbn.backends.cuda.context.launch_stream`)."""
    stream = context.launch_stream()
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append((_name(dispatcher), grid, block, args))
        LAUNCH_STREAMS.append(stream)
    dispatcher[grid, block, stream](*args)


def _threads():
    threads = int(THREADS_PER_BLOCK)
    if threads % WARP_SIZE or not WARP_SIZE <= threads <= MAX_THREADS:
        raise ValueError(f"THREADS_PER_BLOCK must be a multiple of {WARP_SIZE} in [{WARP_SIZE}, {MAX_THREADS}]")
    return threads


def _channel_grid(channels):
    threads = min(_threads(), channels)  # no shuffles here, so any block size will do
    return (channels + threads - 1) // threads, threads


def _elementwise_grid(size):
    threads = _threads()
    return min((size + threads - 1) // threads, int(MAX_ELEMENTWISE_BLOCKS)), threads


class ReductionPlan:
    """Grid, block and work split of a statistics or backward reduction.

    Parameters
    ----------
    layout_is_rows : bool
        ROWS (True) or SLAB layout.
    outer, channels, inner : int
        The layout's shape (``inner`` is 1 for ROWS).
    groups : int, default 1
        Ghost batch norm's G: ``outer`` splits into G groups of ``outer // G``,
        each reduced on its own (blockIdx.z is the group).

    Attributes
    ----------
    splits : int
        Blocks per channel (SLAB) or per tile of channels (ROWS), per group.
    grid, block : tuple of int
        Launch shape of the first launch: ``grid = (C, splits, groups)`` with
        1-D blocks for SLAB; ``grid = (tiles, splits, groups)`` with ``block =
        (width, height)`` for ROWS, ``width`` channels by ``height`` rows.
    chunk : int
        Elements of a channel (SLAB) or rows (ROWS) of one group that one
        block covers.
    groups : int
        G; more than MAX_GROUPS_PER_LAUNCH groups take several launches
        (:meth:`launches`).
    """

    def __init__(self, layout_is_rows, outer, channels, inner, groups=1):
        threads = _threads()
        items = max(1, int(ITEMS_PER_THREAD))
        self.groups = groups
        outer //= groups
        if layout_is_rows:
            # A warp covers width channels of 32 / width consecutive rows: a
            # contiguous run of memory, even when C is small.
            width = min(WARP_SIZE, 1 << max(0, (channels - 1).bit_length()))
            height = threads // width
            rows = outer
            self.splits = max(1, min(int(MAX_SPLITS), math.ceil(rows / (height * items))))
            self.chunk = math.ceil(rows / self.splits)
            columns = math.ceil(channels / width)
            self.block = (width, height)
        else:
            per_channel = outer * inner
            self.splits = max(1, min(int(MAX_SPLITS), math.ceil(per_channel / (threads * items))))
            self.chunk = math.ceil(per_channel / self.splits)
            columns = channels
            self.block = (threads, 1)
        self._per_launch = max(1, min(groups, int(MAX_GROUPS_PER_LAUNCH)))
        self.grid = (columns, self.splits, self._per_launch)

    def __repr__(self):
        return (
            f"ReductionPlan(grid={self.grid}, block={self.block}, splits={self.splits}, chunk={self.chunk}, "
            f"groups={self.groups})"
        )

    def launches(self):
        """The launches that cover every group: ``(grid, first_group)`` pairs."""
        columns, splits, _ = self.grid
        for first in range(0, self.groups, self._per_launch):
            yield (columns, splits, min(self._per_launch, self.groups - first)), first


def stats(plan, layout_is_rows, x, channels, inner, partial_count, partial_mean, partial_m2, pivot):
    """Launch the statistics reduction: per-block partials (float64) and pivots, per group and channel."""
    stats_slab, stats_rows = stats_kernels(accumulator(x.dtype))
    group_size = x.size // plan.groups
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(
                stats_rows,
                grid,
                plan.block,
                x,
                channels,
                group_size,
                first,
                plan.chunk,
                partial_count,
                partial_mean,
                partial_m2,
                pivot,
            )
        else:
            _launch(
                stats_slab,
                grid,
                plan.block,
                x,
                channels,
                inner,
                group_size,
                first,
                plan.chunk,
                partial_count,
                partial_mean,
                partial_m2,
                pivot,
            )


def backward_reduce(
    plan, layout_is_rows, dy, x, y, mean, channels, inner, partial_sum_dy, partial_dotp, *, masked=False
):
    """Launch the backward reduction: per-block partial sum_dy and dotp (float64), per group and channel.

    With ``masked`` the gradient is dy where y > 0, else 0; otherwise ``y`` is
    not read (pass any array of dy's type).
    """
    reduce_slab, reduce_rows = backward_reduce_kernels(accumulator(x.dtype), bool(masked))
    group_size = x.size // plan.groups
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(
                reduce_rows,
                grid,
                plan.block,
                dy,
                x,
                y,
                mean,
                channels,
                group_size,
                first,
                plan.chunk,
                partial_sum_dy,
                partial_dotp,
            )
        else:
            _launch(
                reduce_slab,
                grid,
                plan.block,
                dy,
                x,
                y,
                mean,
                channels,
                inner,
                group_size,
                first,
                plan.chunk,
                partial_sum_dy,
                partial_dotp,
            )


def normalize_flat(x, z, channels, inner, groups, mean, scale, shift, y, *, relu=False, residual=False):
    """Launch y = act((x - mean) * scale + shift [+ z]) over flat layout-ordered arrays.

    The coefficients hold ``groups * channels`` entries (virtual channels).
    ``z`` is read only with ``residual`` (otherwise pass any array of x's type).
    """
    normalize = normalize_kernel(accumulator(x.dtype), bool(relu), bool(residual))
    _launch(normalize, *_elementwise_grid(x.size), x, z, channels, inner, x.size // groups, mean, scale, shift, y)


def backward_elementwise_flat(
    dy, x, y, channels, inner, groups, mean, mean_dy, k, scale, dx, dres, *, masked=False, write_dres=False
):
    """Launch dx = (g - mean_dy - (x - mean) * k) * scale over flat arrays; dres = g if ``write_dres``.

    g is dy, or with ``masked`` dy where y > 0 and 0 elsewhere.  ``y`` and
    ``dres`` are touched only with their options (otherwise pass any array of
    the type).
    """
    backward_elementwise = backward_elementwise_kernel(accumulator(x.dtype), bool(masked), bool(write_dres))
    _launch(
        backward_elementwise,
        *_elementwise_grid(x.size),
        dy,
        x,
        y,
        channels,
        inner,
        x.size // groups,
        mean,
        mean_dy,
        k,
        scale,
        dx,
        dres,
    )


def gather_flat(source, start, shape, strides, destination):
    """Launch the strided-to-contiguous copy (shape and strides already padded to GATHER_RANK)."""
    _launch(gather, *_elementwise_grid(destination.size), source, start, shape, strides, destination)


def launch_per_channel(dispatcher, channels, *args):
    """Launch one of the one-thread-per-channel kernels of :mod:`fastbn.backends.cuda.numerics`."""
    _launch(dispatcher, *_channel_grid(channels), *args)


# ----------------------------------------------------------- signatures ---
_FLAGS = (False, True)


def signatures(dtype):
    """Every kernel the backend launches for input of ``dtype``, with its argument types.

    Per-channel arrays and inputs are the contiguous 1-D arrays the backend
    makes; ``python -m fastbn ptx`` compiles exactly these, and simulator
    tests check that every launch they see has one of them.  Every option
    variant of the generated kernels is listed (four normalize and four
    backward_elementwise kernels, two backward reductions each way).

    Returns
    -------
    list of (str, dispatcher, tuple)
        Kernel name, its dispatcher and its argument types.
    """
    dtype = np.dtype(dtype)
    acc = accumulator(dtype)
    data = types.Array(getattr(types, dtype.name), 1, "C")
    stat = types.Array(getattr(types, np.dtype(acc).name), 1, "C")
    f64 = types.Array(types.float64, 1, "C")
    i64, flag, real = types.int64, types.boolean, types.float64
    index_tuple = types.UniTuple(types.int64, GATHER_RANK)
    stats_slab, stats_rows = stats_kernels(acc)
    table = [
        (stats_slab, (data, i64, i64, i64, i64, i64, f64, f64, f64, f64)),
        (stats_rows, (data, i64, i64, i64, i64, f64, f64, f64, f64)),
        (stats_merge, (f64, f64, f64, f64, stat, stat)),
        (
            forward_coefficients,
            (
                f64,
                f64,
                f64,
                f64,
                real,
                stat,
                flag,
                stat,
                flag,
                flag,
                stat,
                stat,
                real,
                real,
                stat,
                stat,
                f64,
                f64,
                stat,
                stat,
                stat,
                stat,
            ),
        ),
        (normalize_coefficients, (stat, stat, real, stat, flag, stat, flag, stat, stat, stat, stat)),
        (update_running, (stat, stat, f64, f64, real, real)),
        (
            backward_coefficients,
            (f64, f64, stat, stat, flag, i64, flag, flag, stat, stat, stat, stat, stat, stat, stat),
        ),
        (gather, (data, i64, index_tuple, index_tuple, data)),
    ]
    for masked in _FLAGS:
        reduce_slab, reduce_rows = backward_reduce_kernels(acc, masked)
        table.append((reduce_slab, (data, data, data, stat, i64, i64, i64, i64, i64, f64, f64)))
        table.append((reduce_rows, (data, data, data, stat, i64, i64, i64, i64, f64, f64)))
    for residual in _FLAGS:
        for relu in _FLAGS:
            table.append((normalize_kernel(acc, relu, residual), (data, data, i64, i64, i64, stat, stat, stat, data)))
    for write_dres in _FLAGS:
        for masked in _FLAGS:
            table.append(
                (
                    backward_elementwise_kernel(acc, masked, write_dres),
                    (data, data, data, i64, i64, i64, stat, stat, stat, stat, data, data),
                )
            )
    return [(_name(dispatcher), dispatcher, argtypes) for dispatcher, argtypes in table]
