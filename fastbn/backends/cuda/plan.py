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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn.backends.cuda import context
from fastbn.backends.cuda.elementwise import (
    GATHER_RANK,
    INDEX_MASK,
    backward_elementwise_kernel,
    gather,
    normalize_kernel,
    unroll,
)
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
from fastbn.backends.cuda.reductions import backward_eval_kernels, backward_reduce_kernels, stats_kernels
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
#: At least this many elements per thread of a reduction before a channel gets
#: one more block (32 x 256 threads: 8192 elements a block), so that the block's
#: merge (about as costly as a dozen elements a thread) adds a few per cent, not
#: the 30-40 % it added at 16; above that the device's size sets the blocks
#: (REDUCTION_WAVES).
ITEMS_PER_THREAD = 32
#: At most this many blocks per channel (or channel tile) in a reduction:
#: bounds the partials buffer and keeps gridDim.y under its limit of 65535.
MAX_SPLITS = 1024
#: At most this many blocks in an elementwise launch (but one per ghost-batch group where there are
#: more groups, up to gridDim.y's 65535); beyond it the kernels' grid-stride loops take over.
MAX_ELEMENTWISE_BLOCKS = 8192
#: At most this many ghost-batch groups per reduction launch (gridDim.z's limit
#: is 65535); more groups take several launches.
MAX_GROUPS_PER_LAUNCH = 65535

#: Tests set this to a list to record every launch as (kernel name, grid, block, args).
LAUNCH_LOG: list[tuple[str, Any, Any, tuple[Any, ...]]] | None = None
#: With LAUNCH_LOG set, the stream of each launch, in the same order.
LAUNCH_STREAMS: list[Any] = []


# ------------------------------------------------------------- launching ---
def _name(dispatcher: Any) -> str:
    name: str = getattr(dispatcher, "py_func", dispatcher).__name__
    return name


def _launch(dispatcher: Any, grid: Any, block: Any, *args: Any) -> None:
    """Launch on the current call's stream (:func:`fastbn.backends.cuda.context.launch_stream`)."""
    stream = context.launch_stream()
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append((_name(dispatcher), grid, block, args))
        LAUNCH_STREAMS.append(stream)
    dispatcher[grid, block, stream](*args)


def _threads() -> int:
    threads = int(THREADS_PER_BLOCK)
    if threads % WARP_SIZE or not WARP_SIZE <= threads <= MAX_THREADS:
        raise ValueError(f"THREADS_PER_BLOCK must be a multiple of {WARP_SIZE} in [{WARP_SIZE}, {MAX_THREADS}]")
    return threads


def _channel_grid(channels: int) -> tuple[int, int]:
    threads = min(_threads(), channels)  # no shuffles here, so any block size will do
    return (channels + threads - 1) // threads, threads


def _elementwise_grid(
    size: int, channels: int = 1, inner: int = 1, groups: int = 1, elements: int = 4
) -> tuple[tuple[int, int], int, int, int]:
    """Grid, block, ``slab`` and ``period`` of an elementwise launch (:mod:`fastbn.backends.cuda.elementwise`).

    Each thread is meant to take about two inner-loop iterations of
    ``elements`` (:func:`fastbn.backends.cuda.elementwise.unroll`) per run.
    Across rows (any layout): a slab is a group, blockIdx.y walks the
    groups, and ``period`` is as many whole rows of ``channels * inner``
    elements as the x threads hold, but no more than leave a thread two
    iterations; a row longer than the x threads hold gets ``period`` one row,
    and the x threads walk its positions.  Along a channel (SLAB, groups of
    fewer rows than ``elements``, ``inner`` of at least a block): a slab is
    one channel of one row, blockIdx.y walks them, and ``period`` is the x
    threads.  ``gather`` uses the grid alone (one channel of one row).

    Returns
    -------
    (grid, block, slab, period)
        ``grid`` is ``(x blocks, y blocks)``.
    """
    if size > INDEX_MASK:
        raise ValueError(f"the CUDA elementwise kernels index at most {INDEX_MASK} elements, not {size}")
    threads = _threads()
    max_blocks = max(1, int(MAX_ELEMENTWISE_BLOCKS))
    items = 2 * elements
    group_size = size // groups
    row = channels * inner
    rows = group_size // row if row else 0
    if inner >= threads and rows < elements:
        blocks = max(1, min(-(-inner // (threads * items)), max_blocks))
        runs = size // inner
        return (blocks, max(1, min(runs, 65535, max_blocks // blocks))), threads, inner, blocks * threads
    grid_y = max(1, min(groups, 65535))
    capacity = max(1, max_blocks // grid_y) * threads
    if row <= capacity:
        period = max(1, min(-(-rows // items), capacity // max(row, 1))) * max(row, 1)
        blocks = -(-period // threads)
    else:
        period, blocks = row, capacity // threads
    return (blocks, grid_y), threads, max(group_size, 1), period


#: A reduction's grid aims at this many waves of the device (resident blocks on
#: every multiprocessor): enough blocks to keep every multiprocessor's memory
#: requests in flight, with a second wave to even out blocks that finish early,
#: and no more, since every block adds a merge and a partial.
REDUCTION_WAVES = 2
#: Threads a multiprocessor holds at once (2048 on every GPU from cc 7.0 to 9.0
#: but cc 8.6/8.9's 1536), for the resident blocks of a wave.
THREADS_PER_MULTIPROCESSOR = 2048
#: The multiprocessors assumed where the device cannot say (Numba's simulator).
SIMULATED_MULTIPROCESSORS = 8
_MULTIPROCESSORS: dict[int, int] = {}


def multiprocessors() -> int:
    """The current device's multiprocessor count (cached per device), or SIMULATED_MULTIPROCESSORS."""
    from fastbn.backends.cuda import target

    if target.SIMULATOR:
        return int(SIMULATED_MULTIPROCESSORS)
    device = target.cuda.get_current_device()
    key = device.id
    if key not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[key] = int(device.MULTIPROCESSOR_COUNT)
    return _MULTIPROCESSORS[key]


def _target_blocks(threads: int) -> int:
    """Blocks of a reduction's grid: REDUCTION_WAVES waves of resident blocks of ``threads`` threads."""
    return max(1, int(REDUCTION_WAVES) * multiprocessors() * max(1, int(THREADS_PER_MULTIPROCESSOR) // threads))


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
    blocks : int or None
        Blocks the grid aims at; None for REDUCTION_WAVES waves of the current
        device (:func:`multiprocessors`).

    Attributes
    ----------
    splits : int
        Blocks per channel (SLAB) or per tile of channels (ROWS), per group:
        as many as the grid's aim gives each column of the grid, but no more
        than leave each thread ITEMS_PER_THREAD elements, nor MAX_SPLITS.
    grid, block : tuple of int
        Launch shape of the first launch: ``grid = (C, splits, groups)`` with
        1-D blocks for SLAB; ``grid = (tiles, splits, groups)`` with ``block =
        (width, height)`` for ROWS, ``width`` channels by ``height`` rows.
    chunk : int
        Rows of one group that one block covers (ROWS).
    width, row_chunk, col_chunk, col_splits, rows_inner
        SLAB: the block's threads are ``width`` columns (positions along
        ``inner``, a power of two up to the block) by ``threads // width``
        rows of the channel's (rows, inner) matrix; split s covers rows
        ``[s // col_splits * row_chunk, ...)`` by columns ``[s % col_splits *
        col_chunk, ...)``; each thread walks its rows as the inner loop if
        ``rows_inner``, else its columns.
    groups : int
        G; more than MAX_GROUPS_PER_LAUNCH groups take several launches
        (:meth:`launches`).
    """

    def __init__(
        self, layout_is_rows: bool, outer: int, channels: int, inner: int, groups: int = 1, blocks: int | None = None
    ) -> None:
        threads = _threads()
        items = max(1, int(ITEMS_PER_THREAD))
        max_splits = max(1, int(MAX_SPLITS))
        self.groups = groups
        rows = outer // groups
        self._per_launch = max(1, min(groups, int(MAX_GROUPS_PER_LAUNCH)))
        aim = _target_blocks(threads) if blocks is None else max(1, int(blocks))
        if layout_is_rows:
            # A warp covers width channels of 32 / width consecutive rows: a
            # contiguous run of memory, even when C is small.
            width = min(WARP_SIZE, 1 << max(0, (channels - 1).bit_length()))
            height = threads // width
            columns = math.ceil(channels / width)
            wanted = math.ceil(aim / (columns * groups))
            self.splits = max(1, min(max_splits, wanted, math.ceil(rows / (height * items))))
            self.chunk = max(1, math.ceil(rows / self.splits))
            self.splits = max(1, math.ceil(rows / self.chunk))
            self.block = (width, height)
            self.width, self.row_chunk, self.col_chunk, self.col_splits, self.rows_inner = width, self.chunk, 1, 1, True
        else:
            width = min(threads, 1 << max(0, (inner - 1).bit_length()))
            height = threads // width
            columns = channels
            wanted = math.ceil(aim / (columns * groups))
            splits = max(1, min(max_splits, wanted, math.ceil(rows * inner / (threads * items))))
            # Columns first (each thread's columns stay whole), then rows.
            col_splits = max(1, min(splits, math.ceil(inner / width)))
            col_chunk = math.ceil(math.ceil(inner / col_splits) / width) * width
            col_splits = max(1, math.ceil(inner / col_chunk))
            row_splits = max(1, min(splits // col_splits, math.ceil(rows / height)))
            row_chunk = max(1, math.ceil(rows / row_splits))
            row_splits = max(1, math.ceil(rows / row_chunk))
            self.splits = row_splits * col_splits
            self.chunk = row_chunk
            self.width, self.row_chunk, self.col_chunk, self.col_splits = width, row_chunk, col_chunk, col_splits
            # The longer of a thread's two sequences is the unrolled inner loop.
            self.rows_inner = math.ceil(row_chunk / height) >= math.ceil(col_chunk / width)
            self.block = (threads, 1)
        self.grid = (columns, self.splits, self._per_launch)

    def __repr__(self) -> str:
        return (
            f"ReductionPlan(grid={self.grid}, block={self.block}, splits={self.splits}, chunk={self.chunk}, "
            f"width={self.width}, col_chunk={self.col_chunk}, col_splits={self.col_splits}, "
            f"rows_inner={self.rows_inner}, groups={self.groups})"
        )

    def launches(self) -> Iterator[tuple[tuple[int, int, int], int]]:
        """The launches that cover every group: ``(grid, first_group)`` pairs."""
        columns, splits, _ = self.grid
        for first in range(0, self.groups, self._per_launch):
            yield (columns, splits, min(self._per_launch, self.groups - first)), first

    def slab_shape(self) -> tuple[int, int, int, int, bool]:
        """The SLAB kernels' split arguments: ``(width, row_chunk, col_chunk, col_splits, rows_inner)``."""
        return self.width, self.row_chunk, self.col_chunk, self.col_splits, bool(self.rows_inner)


def stats(
    plan: ReductionPlan,
    layout_is_rows: bool,
    x: Any,
    channels: int,
    inner: int,
    partial_count: Any,
    partial_mean: Any,
    partial_m2: Any,
    pivot: Any,
) -> None:
    """Launch the statistics reduction: per-block partials (float64) and pivots, per group and channel."""
    stats_slab, stats_rows = stats_kernels(accumulator(x.dtype))
    group_size = x.size // plan.groups
    partials = (partial_count, partial_mean, partial_m2, pivot)
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(stats_rows, grid, plan.block, x, channels, group_size, first, plan.chunk, *partials)
        else:
            _launch(stats_slab, grid, plan.block, x, channels, inner, group_size, first, *plan.slab_shape(), *partials)


def backward_reduce(
    plan: ReductionPlan,
    layout_is_rows: bool,
    dy: Any,
    x: Any,
    y: Any,
    mean: Any,
    channels: int,
    inner: int,
    partial_sum_dy: Any,
    partial_dotp: Any,
    *,
    masked: bool = False,
    eval_dx: tuple[Any, ...] | None = None,
) -> None:
    """Launch the backward reduction: per-block partial sum_dy and dotp (float64), per group and channel.

    With ``masked`` the gradient is dy where y > 0, else 0; otherwise ``y`` is
    not read (pass any array of dy's type).

    ``eval_dx``, for eval-mode backward (the statistics constants), is
    ``(invstd, weight, has_weight, renorm, r, dx, dres, write_dres)``: the
    same launch then also writes dx = g * invstd * weight (* r with
    ``renorm``) and, with ``write_dres``, dres = g (one pass over dy and x
    instead of two).  ``weight`` and ``r`` are read only with their flags,
    ``dres`` written only with ``write_dres`` (pass any array of the type).
    """
    eval_args: Sequence[Any]
    if eval_dx is None:
        reduce_slab, reduce_rows = backward_reduce_kernels(accumulator(x.dtype), bool(masked))
        # The eval arguments are not read: any arrays of their types will do.
        eval_args = (mean, mean, False, False, mean, dy, dy, False, False)
    else:
        *eval_args, write_dres = eval_dx
        eval_args = (*eval_args, bool(masked), bool(write_dres))
        reduce_slab, reduce_rows = backward_eval_kernels(accumulator(x.dtype))
    group_size = x.size // plan.groups
    arrays = (dy, x, y, mean, *eval_args)
    partials = (partial_sum_dy, partial_dotp)
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(reduce_rows, grid, plan.block, *arrays, channels, group_size, first, plan.chunk, *partials)
        else:
            shape = (channels, inner, group_size, first, *plan.slab_shape())
            _launch(reduce_slab, grid, plan.block, *arrays, *shape, *partials)


def normalize_flat(
    x: Any,
    z: Any,
    channels: int,
    inner: int,
    groups: int,
    mean: Any,
    scale: Any,
    shift: Any,
    y: Any,
    *,
    relu: bool = False,
    residual: bool = False,
) -> None:
    """Launch y = act((x - mean) * scale + shift [+ z]) over flat layout-ordered arrays.

    The coefficients hold ``groups * channels`` entries (virtual channels).
    ``z`` is read only with ``residual`` (otherwise pass any array of x's type).
    """
    normalize = normalize_kernel(np.dtype(x.dtype), bool(relu), bool(residual))
    grid, block, slab, period = _elementwise_grid(x.size, channels, inner, groups, unroll(x.dtype))
    _launch(normalize, grid, block, x, z, channels, inner, x.size // groups, slab, period, mean, scale, shift, y)


def backward_elementwise_flat(
    dy: Any,
    x: Any,
    y: Any,
    channels: int,
    inner: int,
    groups: int,
    mean: Any,
    mean_dy: Any,
    k: Any,
    scale: Any,
    dx: Any,
    dres: Any,
    *,
    masked: bool = False,
    write_dres: bool = False,
) -> None:
    """Launch dx = (g - mean_dy - (x - mean) * k) * scale over flat arrays; dres = g if ``write_dres``.

    g is dy, or with ``masked`` dy where y > 0 and 0 elsewhere.  ``y`` and
    ``dres`` are touched only with their options (otherwise pass any array of
    the type).
    """
    backward_elementwise = backward_elementwise_kernel(np.dtype(x.dtype), bool(masked), bool(write_dres))
    grid, block, slab, period = _elementwise_grid(x.size, channels, inner, groups, unroll(x.dtype))
    _launch(
        backward_elementwise,
        grid,
        block,
        dy,
        x,
        y,
        channels,
        inner,
        x.size // groups,
        slab,
        period,
        mean,
        mean_dy,
        k,
        scale,
        dx,
        dres,
    )


def gather_flat(source: Any, start: int, shape: tuple[int, ...], strides: tuple[int, ...], destination: Any) -> None:
    """Launch the strided-to-contiguous copy (shape and strides already padded to GATHER_RANK)."""
    grid, block, _, _ = _elementwise_grid(destination.size)
    _launch(gather, grid[0], block, source, start, shape, strides, destination)


def launch_per_channel(dispatcher: Any, channels: int, *args: Any) -> None:
    """Launch one of the one-thread-per-channel kernels of :mod:`fastbn.backends.cuda.numerics`."""
    _launch(dispatcher, *_channel_grid(channels), *args)


# ----------------------------------------------------------- signatures ---
_FLAGS = (False, True)


def signatures(dtype: npt.DTypeLike) -> list[tuple[str, Any, tuple[Any, ...]]]:
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
        (stats_slab, (data, i64, i64, i64, i64, i64, i64, i64, i64, flag, f64, f64, f64, f64)),
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
    # backward reductions: (dy, x, y, mean, invstd, weight, has_weight, renorm, r, dx, dres, masked,
    # write_dres, shape..., partials)
    gradients = (data, data, data, stat, stat, stat, flag, flag, stat, data, data, flag, flag)
    reductions = [backward_reduce_kernels(acc, masked) for masked in _FLAGS] + [backward_eval_kernels(acc)]
    for reduce_slab, reduce_rows in reductions:
        table.append((reduce_slab, (*gradients, i64, i64, i64, i64, i64, i64, i64, i64, flag, f64, f64)))
        table.append((reduce_rows, (*gradients, i64, i64, i64, i64, f64, f64)))
    for residual in _FLAGS:
        for relu in _FLAGS:
            table.append(
                (normalize_kernel(dtype, relu, residual), (data, data, i64, i64, i64, i64, i64, stat, stat, stat, data))
            )
    for write_dres in _FLAGS:
        for masked in _FLAGS:
            table.append(
                (
                    backward_elementwise_kernel(dtype, masked, write_dres),
                    (data, data, data, i64, i64, i64, i64, i64, stat, stat, stat, stat, data, data),
                )
            )
    return [(_name(dispatcher), dispatcher, argtypes) for dispatcher, argtypes in table]
