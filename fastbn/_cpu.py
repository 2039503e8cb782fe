"""Numba CPU backend: batch statistics, normalization, gradients, running stats.

Every input reaches this module as a C-contiguous view of one of two shapes
(see :mod:`fastbn._layout`):

* ``SLAB``, shape ``(N, C, L)``: each channel is ``N`` runs of ``L`` contiguous
  elements (NCHW, NCL, NCDHW).
* ``ROWS``, shape ``(M, C)``: channels are contiguous (NHWC, ``(N, C)``).

Batch norm is memory-bound, so each operation is organised around the bytes
it moves through DRAM (see ``plan``):

* ``SLAB``, **fused**, when one task's channels (usually one channel) fit in
  a core's cache and their runs are long (8 KiB or more): the task reads
  them once from DRAM to compute their statistics or gradient sums and makes
  the elementwise pass from cache, so training forward costs one read of x
  and one write of y, and training backward one read of x and dy and one
  write of dx.
* ``SLAB``, **streamed**: statistics over fixed pieces in memory order, then
  an elementwise pass in memory order.  Chosen when the slab does not fit,
  when runs are short (small images), and when the output is a fresh mapping
  whose pages the OS has yet to zero (then writing it in order is what saves
  traffic).  Both SLAB plans compute every reduction on the same pieces in
  the same order, so they agree bit for bit.
* ``ROWS`` streams: statistics over blocks of rows (two passes per block in
  cache, blocks merged with Chan's formula), then the elementwise pass, each
  vectorised across channels.

Outputs larger than the cache are written with non-temporal stores, which
skip reading each output line from DRAM before writing it (see "output
spans" and :mod:`fastbn._nontemporal`).

Every reduction accumulates in float64 and never computes E[x^2] - E[x]^2.
float16 arrays arrive viewed as ``uint16`` (Numba's CPU target has no float16
type) and are converted in registers with the hardware's half<->single
instructions.  Elementwise work is done in the statistics dtype: float32 for
float16 and float32 input, float64 for float64 input.

Work partitions and reduction orders depend only on the shape and dtype,
never on the thread count, so results are bit-for-bit reproducible across
runs and thread counts.
"""

from __future__ import annotations

import ctypes
import mmap

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from fastbn._jit import FASTMATH, inline, kernel
from fastbn._layout import ROWS, SLAB
from fastbn._nontemporal import stream_copy
from fastbn._threading import kernel_guard

# Largest working set of one fused task, in bytes of input read (x; x and dy;
# x, dy and the ReLU's output).  A fused task re-reads it from cache, so it
# must fit in a core's share of L2 + L3 (4.5 MiB on the 2-core CI machine);
# 3 MiB lets the masked backward of a 56 x 56 x 64-image channel (2.4 MiB) fuse
# (measured 7% faster).  The plans agree bit for bit, so this figure changes
# speed only, never a result.
_FUSE_BYTES = 3 << 20
# A fused SLAB task reads each outer row of its channels as one contiguous
# run.  Runs shorter than this (14 x 14 images are 784 bytes) starve the
# hardware prefetchers, so neighbouring channels are grouped until a run is
# about this long (short runs take the fused plan only when it has more
# parallel tasks, see ``plan``).
_RUN_BYTES = 4096
# The fused plan is taken only when a channel's runs are at least this long
# (see ``plan``): measured here, it beat the streamed plan on 8 KiB runs and
# lost to it on 4 KiB runs (forward and backward alike).
_FUSE_RUN_BYTES = 8192
# Fused tasks are at least this many when the channels allow, so that every
# core gets several and the last one to finish does not leave the others idle.
_MIN_TASKS = 8
# Rows per block in the streamed ROWS plan: a block of about 16 Ki elements
# (64 KiB in float32) stays in L2 between the two passes of its statistics.
_BLOCK_ELEMENTS = 16384
# SLAB pieces (see "SLAB pieces" below): at least _MIN_PIECE elements, so that
# per-piece summaries stay small (16 bytes per 1 KiB of float32 x), and at most
# _MAX_PIECE (16 KiB in float32), so that a piece stays in L1/L2 between the
# two passes of its statistics.
_MIN_PIECE = 256
_MAX_PIECE = 4096
# Outputs smaller than this are assumed to reuse memory (see ``untouched``).
_FRESH_PROBE_BYTES = 4 << 20
# At most this many chunks' partial statistics are kept; a fixed number keeps
# the reduction order independent of the thread count.
_MAX_CHUNKS = 64
# Outputs of at least this many bytes (the CI machine's L3) are written with
# non-temporal stores (see fastbn._nontemporal): they would not stay in cache
# for their next reader anyway, and writing around the cache saves reading
# every output line from DRAM first.  Smaller outputs are left in cache.
_NONTEMPORAL_BYTES = 8 << 20
# Elements per scratch chunk that a task computes in L1 before streaming it
# out (8 KiB in float32).
_STREAM_CHUNK = 2048
# The streamed SLAB elementwise passes give a task one outer row of enough
# channels for a contiguous block of about this many bytes of input.
_TASK_BYTES = 64 << 10


# ---------------------------------------------------------------- float16 ---
@intrinsic
def _half_bits_to_float(typingctx, bits):
    """Reinterpret 16 bits as IEEE half and widen to float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _float_to_half_bits(typingctx, value):
    """Round float32 to IEEE half (to nearest even, as NumPy) and return its bits."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def load(value):
    """Read one element as a number: float16 bits become float32."""


@overload(load, inline="always")
def _load_impl(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float(value)
    return lambda value: value


def cast_to(array, value):
    """Convert ``value`` to the element type stored in ``array`` (or to the type of the number ``array``)."""


@overload(cast_to, inline="always")
def _cast_to_impl(array, value):
    kind = array.dtype if isinstance(array, types.Array) else array  # an array, or a number of that type
    if kind == types.uint16:
        return lambda array, value: _float_to_half_bits(np.float32(value))
    if kind == types.float32:
        return lambda array, value: np.float32(value)
    return lambda array, value: np.float64(value)


# ------------------------------------------------------ optional operands ---
# The fused variants (activation, residual, the ReLU mask in backward, the
# residual's gradient) pass an array or None.  These helpers are resolved when
# Numba types a kernel: with None they compile to nothing, so the plain batch
# norm pays no branch, and each combination is its own specialisation.


def part(array, index):
    """``array[index]``, or None when ``array`` is None (a run or row of an optional operand)."""


@overload(part, inline="always")
def _part_impl(array, index):
    if isinstance(array, types.NoneType):
        return lambda array, index: None
    return lambda array, index: array[index]


def plus(value, addend, i):
    """``value + addend[i]`` (the residual), or ``value`` when ``addend`` is None."""


@overload(plus, inline="always")
def _plus_impl(value, addend, i):
    if isinstance(addend, types.NoneType):
        return lambda value, addend, i: value
    return lambda value, addend, i: value + load(addend[i])


def gradient(dy, mask, i):
    """``dy[i]`` where ``mask[i] > 0`` (the ReLU's output), else 0; ``dy[i]`` when ``mask`` is None.

    NaN in the output passes no gradient, as in PyTorch's ``threshold_backward``.
    """


@overload(gradient, inline="always")
def _gradient_impl(dy, mask, i):
    if isinstance(mask, types.NoneType):
        return lambda dy, mask, i: load(dy[i])
    zero = np.float64(0) if dy.dtype == types.float64 else np.float32(0)  # float32 for float16 and float32

    def impl(dy, mask, i):
        return _select(load(mask[i]) > 0, load(dy[i]), zero)

    return impl


def store(array, i, value):
    """``array[i] = value`` (converted to its element type); nothing when ``array`` is None."""


@overload(store, inline="always")
def _store_impl(array, i, value):
    if isinstance(array, types.NoneType):
        return lambda array, i, value: None

    def impl(array, i, value):
        array[i] = cast_to(array, value)

    return impl


def flat(array):
    """``array.reshape(-1)`` of a C-contiguous array, or None when ``array`` is None."""


@overload(flat, inline="always")
def _flat_impl(array):
    if isinstance(array, types.NoneType):
        return lambda array: None
    return lambda array: array.reshape(-1)


def scratch_for(nt, array, size):
    """An uninitialised buffer of ``size`` elements of ``array``'s dtype, or None when ``nt`` or ``array`` is None."""


@overload(scratch_for, inline="always")
def _scratch_for_impl(nt, array, size):
    if isinstance(nt, types.NoneType) or isinstance(array, types.NoneType):
        return lambda nt, array, size: None
    return lambda nt, array, size: np.empty(size, array.dtype)


def stream_out(dst, src):
    """:func:`fastbn._nontemporal.stream_copy`, or nothing when ``dst`` is None."""


@overload(stream_out, inline="always")
def _stream_out_impl(dst, src):
    if isinstance(dst, types.NoneType):
        return lambda dst, src: None
    return lambda dst, src: stream_copy(dst, src)


@numba.njit(fastmath=set(FASTMATH))
def _select(condition, if_true, if_false):
    """``if_true if condition else if_false``, compiled to a select (no branch in vector loops).

    Left to LLVM to inline: inlining a function with a branch at the Numba IR
    level trips Numba's SSA checks (NumbaIRAssumptionWarning).
    """
    if condition:
        return if_true
    return if_false


@inline
def clamp_below(value, floor):
    """``max(value, floor)`` that keeps NaN (the ReLU with floor 0; identity with floor -inf)."""
    return floor if value < floor else value


# ------------------------------------------------------------------ plans ---
def _slab_group(shape, itemsize, tensors):
    """Channels per fused task of an ``(N, C, L)`` view; 0 means stream instead.

    ``tensors`` is how many inputs a task reads (1 for statistics and forward,
    2 for backward: x and dy).
    """
    outer, channels, inner = shape
    channel_bytes = max(1, outer * inner * itemsize * tensors)
    if channel_bytes > _FUSE_BYTES:
        return 0
    group = max(1, _RUN_BYTES // max(1, inner * itemsize))
    group = min(group, _FUSE_BYTES // channel_bytes, max(1, channels // _MIN_TASKS))
    return max(1, group)


# ------------------------------------------------------------- small math ---
@numba.njit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries: Chan et al., stable for any split.

    Compiled without fast-math (LLVM still inlines it): the fused and streamed
    SLAB plans call it from different loops, and contraction or reassociation
    chosen differently in each would break their bit-for-bit agreement.
    """
    n = n_a + n_b
    if n_b == 0:
        return mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
    return mean, m2


@numba.njit
def _merge_piece(count, mean, m2, size, piece_mean, piece_m2):
    """Merge a piece of ``size`` elements per channel into every channel's (count, mean, M2), in place.

    :func:`_chan_merge`'s arithmetic, operation for operation, across a row
    of channels: the count ratios are computed once per piece, not once per
    channel (they are the same for all), and the loop vectorises.  Both SLAB
    plans merge with it, compiled without fast-math (see _chan_merge); ROWS
    merges its blocks with it too.
    """
    if size == 0:
        return
    weight = size / (count + size)
    weight_ab = count * weight
    for j in range(mean.shape[0]):
        delta = piece_mean[j] - mean[j]
        mean[j] = mean[j] + delta * weight
        m2[j] = m2[j] + piece_m2[j] + delta * delta * weight_ab


@numba.njit
def _add_piece(total, piece):
    """``total += piece``, elementwise, compiled without fast-math: the gradient sums' per-piece partials
    are added in piece order by both SLAB plans."""
    for j in range(total.shape[0]):
        total[j] += piece[j]


@inline
def _row_block(M, C):
    """Rows per block and number of blocks for an (M, C) ROWS view."""
    rows = max(1, _BLOCK_ELEMENTS // C)
    return rows, (M + rows - 1) // rows


# ------------------------------------------------------------ inner loops ---
# Every inner loop runs over a 1-D contiguous view with an index from
# range(len): Numba then knows the index is non-negative and drops its
# negative-index check, which otherwise blocks vectorisation (2.5x slower).
# "run" helpers work on one channel's contiguous run with scalar statistics
# (SLAB); "cols" helpers work across a row's channels with per-channel arrays
# (ROWS).


# The per-run reductions are compiled once per signature, as functions of
# their own, and called by every kernel that reduces runs: inlined at Numba's
# level, each kernel got its own copy of the loop for LLVM to vectorise, and
# two copies (the fused plan's kernel with and without non-temporal stores,
# or the fused and the streamed plan) summed in different lane orders in some
# runs of the test suite, giving float64 sums 1 ulp apart.  One compiled copy
# fixes the order.
_reduction = numba.njit(fastmath=set(FASTMATH))


@_reduction
def _run_sum(v):
    total = 0.0
    for i in range(v.shape[0]):
        total += load(v[i])
    return total


@_reduction
def _run_sum_widen(v, wide):
    # Sum in float64, keeping each widened element for the second pass.
    total = 0.0
    for i in range(v.shape[0]):
        value = np.float64(load(v[i]))
        wide[i] = value
        total += value
    return total


@_reduction
def _run_sum_sq_dev(v, mean):
    # Squared deviations from the float64 mean (second of two passes).
    total = 0.0
    for i in range(v.shape[0]):
        d = load(v[i]) - mean
        total += d * d
    return total


# The elementwise helpers (per run, and per row of channels), and the
# per-channel coefficients they use (_coefficients, _dx_coefficients), are
# compiled as functions of their own, without 'reassoc' or 'contract',
# because several callers must get the same bits from them: both SLAB plans,
# and ordinary and non-temporal stores.  With 'reassoc' LLVM ordered a
# three-term sum (the residual add, dx's two subtractions) differently in two
# kernels; the streamed backward once computed its coefficients in NumPy
# while the fused kernel computed them with 'reassoc', and float64 dx
# differed by 1 ulp between the plans.  Without 'contract' as well, every
# operation is rounded as written, whatever LLVM inlines or vectorises.  They
# still vectorise (there is no reduction), and an FMA saves nothing in a pass
# bound by memory.
_ELEMENTWISE_FASTMATH = frozenset(FASTMATH & {"nsz"})


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _run_affine(v, z, out, mean, scale, shift, floor):
    # y = act((x - mean) * scale + shift + z): z (residual) optional, act = max(., floor).
    for i in range(v.shape[0]):
        out[i] = cast_to(out, clamp_below(plus((load(v[i]) - mean) * scale + shift, z, i), floor))


@_reduction
def _run_grad_sums(g, m, v, mean):
    # m: the ReLU's output (the gradient passes where it is > 0), or None.
    sum_dy = 0.0
    dotp = 0.0
    for i in range(v.shape[0]):
        gi = gradient(g, m, i)
        sum_dy += gi
        dotp += (np.float64(load(v[i])) - mean) * gi
    return sum_dy, dotp


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _run_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    # dres: the residual's gradient (the masked dy), written in the same pass, or None.
    for i in range(v.shape[0]):
        gi = gradient(g, m, i)
        centred = load(v[i]) - mean
        out[i] = cast_to(out, (gi - mean_dy - centred * k) * scale)
        store(dres, i, gi)


@inline
def _cols_sum(v, total):
    for j in range(v.shape[0]):
        total[j] += load(v[j])


@inline
def _cols_sum_sq_dev(v, mean, m2):
    for j in range(v.shape[0]):
        d = load(v[j]) - mean[j]
        m2[j] += d * d


# Two rows at a time: one load and store of each float64 accumulator per
# two elements instead of one (the accumulators live in L1, and loading and
# storing them bounds the one-row loops; measured 20% faster).


@inline
def _cols_sum2(a, b, total):
    for j in range(a.shape[0]):
        total[j] += np.float64(load(a[j])) + np.float64(load(b[j]))


@inline
def _cols_sum_sq_dev2(a, b, mean, m2):
    for j in range(a.shape[0]):
        da = load(a[j]) - mean[j]
        db = load(b[j]) - mean[j]
        m2[j] += da * da + db * db


@inline
def _cols_grad_sums2(ga, ma, a, gb, mb, b, mean, sum_dy, dotp):
    for j in range(a.shape[0]):
        g0 = np.float64(gradient(ga, ma, j))
        g1 = np.float64(gradient(gb, mb, j))
        sum_dy[j] += g0 + g1
        dotp[j] += (np.float64(load(a[j])) - mean[j]) * g0 + (np.float64(load(b[j])) - mean[j]) * g1


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _cols_affine(v, z, out, mean, scale, shift, floor):
    for j in range(v.shape[0]):
        out[j] = cast_to(out, clamp_below(plus((load(v[j]) - mean[j]) * scale[j] + shift[j], z, j), floor))


@inline
def _cols_grad_sums(g, m, v, mean, sum_dy, dotp):
    for j in range(v.shape[0]):
        gj = gradient(g, m, j)
        sum_dy[j] += gj
        dotp[j] += (np.float64(load(v[j])) - mean[j]) * gj


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _cols_dx(g, m, v, out, dres, mean, mean_dy, k, scale):
    for j in range(v.shape[0]):
        gj = gradient(g, m, j)
        centred = load(v[j]) - mean[j]
        out[j] = cast_to(out, (gj - mean_dy[j] - centred * k[j]) * scale[j])
        store(dres, j, gj)


# ---------------------------------------------------------- output spans ---
# The elementwise passes hand each block of output to an ``_emit_*`` helper
# with a ``scratch`` buffer per task: None for ordinary stores (the per-run
# loops write the output directly), or an L1-sized buffer for non-temporal
# ones, used for outputs larger than the cache (the kernels' ``nt`` argument,
# see ``nontemporal``).  Then the block, a span of the output's flat (C-order)
# index, is computed chunk by chunk into the scratch buffer that stream_copy
# writes around the cache (see fastbn._nontemporal): whole spans, because
# short runs streamed one by one leave partial lines at both ends (that was
# slower than ordinary stores on 14 x 14 images).  The choice is made when
# Numba types a kernel, so kernels for small outputs compile exactly as
# without it (compiled into every kernel, the streaming writers made
# compilation markedly slower), and each element is computed by the same
# per-run helper either way, so it never changes a value.


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _slab_stream_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y_flat, scratch):
    # y[n, c0:c1], the span of flat elements (n * C + c0) * L onwards, chunk by chunk through scratch.  The
    # walk keeps its place as (channel, column) rather than dividing flat positions (integer division costs
    # more than a short run's arithmetic).
    _, C, L = x.shape
    step = scratch.shape[0]
    start = (n * C + c0) * L
    filled = 0
    for c in range(c0, c1):
        i = 0
        while i < L:
            take = min(L - i, step - filled)
            _run_affine(x[n, c, i:i + take], part(z, (n, c, slice(i, i + take))), scratch[filled:filled + take],
                        mean[c - offset], scale[c - offset], shift[c - offset], floor)
            filled += take
            i += take
            if filled == step:
                stream_copy(y_flat[start:start + step], scratch)
                start += step
                filled = 0
    stream_copy(y_flat[start:start + filled], scratch[:filled])


def _emit_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
    """y[n, c0:c1] of an (N, C, L) view, coefficients indexed by channel - offset; scratch as above."""


@overload(_emit_affine, inline="always")
def _emit_affine_impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
    if isinstance(scratch, types.NoneType):
        def impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
            for c in range(c0, c1):
                _run_affine(x[n, c], part(z, (n, c)), y[n, c], mean[c - offset], scale[c - offset],
                            shift[c - offset], floor)
        return impl

    def impl(x, z, mean, scale, shift, floor, offset, n, c0, c1, y, scratch):
        _slab_stream_affine(x, z, mean, scale, shift, floor, offset, n, c0, c1, y.reshape(-1), scratch)
    return impl


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _slab_stream_dx(dy, m, x, mean, mean_dy, k, scale, offset, n, c0, c1, dx_flat, dres_flat, scratch, dres_scratch):
    # dx[n, c0:c1] (and dres), walked as in _slab_stream_affine.
    _, C, L = x.shape
    step = scratch.shape[0]
    start = (n * C + c0) * L
    filled = 0
    for c in range(c0, c1):
        i = 0
        while i < L:
            take = min(L - i, step - filled)
            _run_dx(dy[n, c, i:i + take], part(m, (n, c, slice(i, i + take))), x[n, c, i:i + take],
                    scratch[filled:filled + take], part(dres_scratch, slice(filled, filled + take)),
                    mean[c - offset], mean_dy[c - offset], k[c - offset], scale[c - offset])
            filled += take
            i += take
            if filled == step:
                stream_copy(dx_flat[start:start + step], scratch)
                stream_out(part(dres_flat, slice(start, start + step)), dres_scratch)
                start += step
                filled = 0
    stream_copy(dx_flat[start:start + filled], scratch[:filled])
    stream_out(part(dres_flat, slice(start, start + filled)), part(dres_scratch, slice(0, filled)))


def _emit_dx(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
    """dx[n, c0:c1] (and dres) of (N, C, L) views, coefficients indexed by channel - offset; scratch as above."""


@overload(_emit_dx, inline="always")
def _emit_dx_impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
    if isinstance(scratch, types.NoneType):
        def impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
            for c in range(c0, c1):
                _run_dx(dy[n, c], part(m, (n, c)), x[n, c], dx[n, c], part(dres, (n, c)), mean[c - offset],
                        mean_dy[c - offset], k[c - offset], scale[c - offset])
        return impl

    def impl(dy, m, x, dres, mean, mean_dy, k, scale, offset, n, c0, c1, dx, scratch, dres_scratch):
        _slab_stream_dx(dy, m, x, mean, mean_dy, k, scale, offset, n, c0, c1, dx.reshape(-1), flat(dres), scratch,
                        dres_scratch)
    return impl


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _rows_stream_affine(x, z, mean, scale, shift, floor, r0, r1, y_flat, scratch):
    C = x.shape[1]
    step = scratch.shape[0] // C
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        for r in range(e - s):
            _cols_affine(x[s + r], part(z, s + r), scratch[r * C:(r + 1) * C], mean, scale, shift, floor)
        stream_copy(y_flat[s * C:e * C], scratch)


def _emit_rows_affine(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
    """Rows r0..r1-1 of y for an (M, C) view; scratch as above, of at least C elements."""


@overload(_emit_rows_affine, inline="always")
def _emit_rows_affine_impl(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
    if isinstance(scratch, types.NoneType):
        def impl(x, z, mean, scale, shift, floor, r0, r1, y, scratch):
            for r in range(r0, r1):
                _cols_affine(x[r], part(z, r), y[r], mean, scale, shift, floor)
        return impl
    return lambda x, z, mean, scale, shift, floor, r0, r1, y, scratch: _rows_stream_affine(
        x, z, mean, scale, shift, floor, r0, r1, y.reshape(-1), scratch)


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _rows_stream_dx(dy, m, x, mean, mean_dy, k, scale, r0, r1, dx_flat, dres_flat, scratch, dres_scratch):
    C = x.shape[1]
    step = scratch.shape[0] // C
    for s in range(r0, r1, step):
        e = min(r1, s + step)
        for r in range(e - s):
            _cols_dx(dy[s + r], part(m, s + r), x[s + r], scratch[r * C:(r + 1) * C],
                     part(dres_scratch, slice(r * C, (r + 1) * C)), mean, mean_dy, k, scale)
        stream_copy(dx_flat[s * C:e * C], scratch)
        stream_out(part(dres_flat, slice(s * C, e * C)), dres_scratch)


def _emit_rows_dx(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
    """Rows r0..r1-1 of dx (and dres) for (M, C) views; scratch as in :func:`_emit_rows_affine`."""


@overload(_emit_rows_dx, inline="always")
def _emit_rows_dx_impl(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
    if isinstance(scratch, types.NoneType):
        def impl(dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch):
            for r in range(r0, r1):
                _cols_dx(dy[r], part(m, r), x[r], dx[r], part(dres, r), mean, mean_dy, k, scale)
        return impl
    return lambda dy, m, x, dres, mean, mean_dy, k, scale, r0, r1, dx, scratch, dres_scratch: _rows_stream_dx(
        dy, m, x, mean, mean_dy, k, scale, r0, r1, dx.reshape(-1), flat(dres), scratch, dres_scratch)


# ------------------------------------------------------------ SLAB pieces ---
# Every SLAB reduction is defined on the same fixed pieces, so that the fused
# and streamed plans compute bit-for-bit the same statistics and gradient
# sums (the plan may then be picked per call, see ``plan``).  A piece is one
# channel's elements in outer rows n0..n1-1 and columns i0..i1-1: whole runs
# grouped until a piece has _MIN_PIECE elements, or a long run split into
# parts of at most _MAX_PIECE.  Each piece gets an exact two-pass mean and M2
# in float64 while it sits in L1/L2; a channel's pieces are merged in piece
# order with Chan's formula.  Gradient sums are float64 partials per piece,
# added in piece order.


@inline
def _slab_pieces(N, L):
    """Runs per piece, pieces per outer row, and the number of pieces."""
    if L >= _MIN_PIECE:
        runs = 1
        per_row = (L + _MAX_PIECE - 1) // _MAX_PIECE
    else:
        runs = (_MIN_PIECE + L - 1) // max(1, L)
        per_row = 1
    return runs, per_row, (N + runs - 1) // runs * per_row


@inline
def _piece_capacity(L):
    """Elements of the largest piece (whole short runs, or a part of a long one)."""
    runs, per_row, _ = _slab_pieces(1, L)
    return runs * ((L + per_row - 1) // per_row)


@inline
def _slab_piece(p, N, L, runs, per_row):
    """Bounds (n0, n1, i0, i1) of piece p."""
    n0 = (p // per_row) * runs
    part = p % per_row
    return n0, min(N, n0 + runs), part * L // per_row, (part + 1) * L // per_row


@inline
def _piece_stats(x, c, n0, n1, i0, i1, scratch):
    # Two passes (mean, then squared deviations), both accumulated in float64:
    # never E[x^2] - E[x]^2, which cancels when |mean| >> std.  The first pass
    # keeps the piece widened to float64 in ``scratch`` (L1), so the second
    # converts nothing and DRAM sees x once.
    width = i1 - i0
    total = 0.0
    for n in range(n1 - n0):
        total += _run_sum_widen(x[n0 + n, c, i0:i1], scratch[n * width:(n + 1) * width])
    size = (n1 - n0) * width
    mean = total / size
    return mean, _run_sum_sq_dev(scratch[:size], mean)


@inline
def _piece_grad_sums(dy, m, x, c, n0, n1, i0, i1, mean):
    sum_dy = 0.0
    dotp = 0.0
    for n in range(n1 - n0):
        run_dy, run_dotp = _run_grad_sums(dy[n0 + n, c, i0:i1], part(m, (n0 + n, c, slice(i0, i1))),
                                          x[n0 + n, c, i0:i1], mean)
        sum_dy += run_dy
        dotp += run_dotp
    return sum_dy, dotp


# ------------------------------------------------------ SLAB, fused plan ---
# A task owns channels c0..c1-1 (one, unless runs are short: see
# _slab_group) and walks their pieces in order, so its channels are read from
# DRAM once and re-read from cache by the later passes.


@inline
def _slab_group_stats(x, c0, c1):
    N, _, L = x.shape
    runs, per_row, npieces = _slab_pieces(N, L)
    mean = np.zeros(c1 - c0)
    m2 = np.zeros(c1 - c0)
    piece_mean = np.empty(c1 - c0)
    piece_m2 = np.empty(c1 - c0)
    scratch = np.empty(_piece_capacity(L))
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = _slab_piece(p, N, L, runs, per_row)
        for j in range(c1 - c0):
            piece_mean[j], piece_m2[j] = _piece_stats(x, c0 + j, n0, n1, i0, i1, scratch)
        size = (n1 - n0) * (i1 - i0)
        _merge_piece(count, mean, m2, size, piece_mean, piece_m2)
        count += size
    return mean, m2 / (N * L)


@kernel
def stats_slab(x, group, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, fused plan."""
    C = x.shape[1]
    for t in prange((C + group - 1) // group):
        c0 = t * group
        c1 = min(C, c0 + group)
        mean, var = _slab_group_stats(x, c0, c1)
        mean_out[c0:c1] = mean
        var_out[c0:c1] = var


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _coefficients(mean, var, eps, weight, bias, ren_mean, ren_var, renorm, rmax, dmax):
    """One channel's training coefficients from its float64 batch statistics.

    Returns float64 ``invstd``, and in the statistics dtype (``weight``'s
    element type) ``r``, ``d``, the mean to subtract, ``scale`` and ``shift``,
    so that ``y = (x - mean) * scale + shift``.  The output is computed with
    the mean and invstd rounded to the statistics dtype, the values saved for
    backward, so that backward sees exactly the statistics forward used.

    With ``renorm`` (batch renormalization, Ioffe 2017) and ``sigma = sqrt(var
    + eps)``: ``r = clip(sigma / sigma_running, 1/rmax, rmax)``, ``d =
    clip((mean - mean_running) / sigma_running, -dmax, dmax)``, ``scale =
    invstd * r * weight`` and ``shift = d * weight + bias``; otherwise r = 1,
    d = 0.
    """
    invstd = 1.0 / np.sqrt(var + eps)
    r = 1.0
    d = 0.0
    if renorm:
        sigma_running = np.sqrt(np.float64(ren_var) + eps)
        r = min(max(np.sqrt(var + eps) / sigma_running, 1.0 / rmax), rmax)
        d = min(max((mean - np.float64(ren_mean)) / sigma_running, -dmax), dmax)
    r_used = cast_to(weight, r)
    d_used = cast_to(weight, d)
    scale = cast_to(weight, np.float64(cast_to(weight, invstd)) * np.float64(weight) * np.float64(r_used))
    shift = bias
    if renorm:
        shift = cast_to(weight, np.float64(d_used) * np.float64(weight) + np.float64(bias))
    return invstd, r_used, d_used, cast_to(weight, mean), scale, shift


@kernel(parallel=False)
def train_coefficients(mean, var, eps, weight, bias, ren_mean, ren_var, renorm, rmax, dmax,
                       invstd_out, r_out, d_out, used_mean_out, scale_out, shift_out):
    """:func:`_coefficients` for every channel, for the streamed plans."""
    for c in range(mean.shape[0]):
        invstd_out[c], r_out[c], d_out[c], used_mean_out[c], scale_out[c], shift_out[c] = _coefficients(
            mean[c], var[c], eps, weight[c], bias[c], ren_mean[c], ren_var[c], renorm, rmax, dmax
        )


@numba.njit(fastmath=set(_ELEMENTWISE_FASTMATH))
def _dx_coefficients(sum_dy, dotp, invstd, weight, count):
    """One channel's ``(mean_dy, k, scale)`` for dx, in ``weight``'s dtype, from its float64 gradient sums.

    ``dx = (g - mean_dy - (x - mean) * k) * scale`` with ``mean_dy = sum(g) /
    count``, ``k = sum((x - mean) g) invstd^2 / count`` and ``scale = invstd *
    weight``.  Compiled on its own without 'reassoc' (as :func:`_coefficients`
    and the elementwise helpers are), so both plans get the same bits.
    """
    istd = np.float64(invstd)
    return (cast_to(weight, sum_dy / count), cast_to(weight, dotp * istd * istd / count),
            cast_to(weight, istd * np.float64(weight)))


@kernel(parallel=False)
def dx_coefficients(sum_dy, dotp, invstd, weight, count, mean_dy_out, k_out, scale_out):
    """:func:`_dx_coefficients` for every channel, for the streamed plans."""
    for c in range(sum_dy.shape[0]):
        mean_dy_out[c], k_out[c], scale_out[c] = _dx_coefficients(sum_dy[c], dotp[c], invstd[c], weight[c], count)


@kernel
def forward_train_slab(x, z, group, weight, bias, eps, floor, ren_mean, ren_var, renorm, rmax, dmax, y, nt,
                       mean_out, var_out, invstd_out, r_out, d_out):
    """Fused training forward: a group's statistics, then its output, from cache.

    ``y = max((x - mean) * scale + shift + z, floor)``: ``z`` (the residual)
    may be None; ``floor`` is 0 for the ReLU, -inf for none; ``nt`` selects
    non-temporal stores (see "output spans").
    """
    N, C, _ = x.shape
    for t in prange((C + group - 1) // group):
        c0 = t * group
        c1 = min(C, c0 + group)
        mean, var = _slab_group_stats(x, c0, c1)
        used_mean = np.empty_like(weight[c0:c1])
        scale = np.empty_like(weight[c0:c1])
        shift = np.empty_like(weight[c0:c1])
        for j in range(c1 - c0):
            c = c0 + j
            mean_out[c] = mean[j]
            var_out[c] = var[j]
            invstd_out[c], r_out[c], d_out[c], used_mean[j], scale[j], shift[j] = _coefficients(
                mean[j], var[j], eps, weight[c], bias[c], ren_mean[c], ren_var[c], renorm, rmax, dmax
            )
        scratch = scratch_for(nt, y, _STREAM_CHUNK)
        for n in range(N):
            _emit_affine(x, z, used_mean, scale, shift, floor, c0, n, c0, c1, y, scratch)


@kernel
def backward_train_slab(dy, m, x, dres, group, mean, invstd, weight, dx, nt, sum_dy_out, dotp_out):
    """Fused training backward: a group's gradient sums, then its dx, from cache.

    ``m`` is the ReLU's output (the gradient passes where it is > 0) or None;
    ``dres``, the residual's gradient (the masked dy), is written alongside
    dx, or is None.  ``nt`` as in :func:`forward_train_slab`.
    """
    N, C, L = x.shape
    runs, per_row, npieces = _slab_pieces(N, L)
    count = N * L
    for t in prange((C + group - 1) // group):
        c0 = t * group
        c1 = min(C, c0 + group)
        w = c1 - c0
        sum_dy = np.zeros(w)
        dotp = np.zeros(w)
        piece_dy = np.empty(w)
        piece_dotp = np.empty(w)
        for p in range(npieces):
            n0, n1, i0, i1 = _slab_piece(p, N, L, runs, per_row)
            for j in range(w):
                piece_dy[j], piece_dotp[j] = _piece_grad_sums(dy, m, x, c0 + j, n0, n1, i0, i1,
                                                              np.float64(mean[c0 + j]))
            _add_piece(sum_dy, piece_dy)
            _add_piece(dotp, piece_dotp)
        mean_dy = np.empty_like(weight[c0:c1])
        k = np.empty_like(weight[c0:c1])
        scale = np.empty_like(weight[c0:c1])
        for j in range(w):
            sum_dy_out[c0 + j] = sum_dy[j]
            dotp_out[c0 + j] = dotp[j]
            mean_dy[j], k[j], scale[j] = _dx_coefficients(sum_dy[j], dotp[j], invstd[c0 + j], weight[c0 + j], count)
        scratch = scratch_for(nt, dx, _STREAM_CHUNK)
        dres_scratch = scratch_for(nt, dres, _STREAM_CHUNK)
        for n in range(N):
            _emit_dx(dy, m, x, dres, mean[c0:c1], mean_dy, k, scale, c0, n, c0, c1, dx, scratch, dres_scratch)


# --------------------------------------------------- SLAB, streamed plan ---
# Work runs in memory order: pieces in parallel, each over every channel,
# keeping one summary per (piece, channel) (16 bytes per 1 KiB of x); a
# second, tiny loop merges each channel's summaries in piece order, exactly
# as the fused plan does.  Elementwise passes stream over (n, c) runs.


@kernel
def stats_slab_streamed(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, streamed plan."""
    N, C, L = x.shape
    runs, per_row, npieces = _slab_pieces(N, L)
    piece_mean = np.empty((npieces, C))
    piece_m2 = np.empty((npieces, C))
    for p in prange(npieces):
        n0, n1, i0, i1 = _slab_piece(p, N, L, runs, per_row)
        scratch = np.empty(_piece_capacity(L))
        for c in range(C):
            piece_mean[p, c], piece_m2[p, c] = _piece_stats(x, c, n0, n1, i0, i1, scratch)
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = _slab_piece(p, N, L, runs, per_row)
        size = (n1 - n0) * (i1 - i0)
        _merge_piece(count, mean, m2, size, piece_mean[p], piece_m2[p])
        count += size
    mean_out[:] = mean
    var_out[:] = m2 / (N * L)


@kernel
def normalize_slab(x, z, mean, scale, shift, floor, y, group, nt):
    """y = max((x - mean) * scale + shift + z, floor) per channel of an (N, C, L) view, streamed; z may be None.

    A task is one outer row of ``group`` channels (see ``run_group``).
    """
    N, C, _ = x.shape
    tasks = (C + group - 1) // group
    for t in prange(N * tasks):
        n = t // tasks
        c0 = (t - n * tasks) * group
        _emit_affine(x, z, mean, scale, shift, floor, 0, n, c0, min(C, c0 + group), y,
                     scratch_for(nt, y, _STREAM_CHUNK))


@kernel
def backward_reduce_slab(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (N, C, L) views, streamed, in float64.

    ``g`` is dy, masked where the ReLU output ``m`` is not > 0 unless ``m`` is None.
    """
    N, C, L = x.shape
    runs, per_row, npieces = _slab_pieces(N, L)
    piece_dy = np.empty((npieces, C))
    piece_dotp = np.empty((npieces, C))
    for p in prange(npieces):
        n0, n1, i0, i1 = _slab_piece(p, N, L, runs, per_row)
        for c in range(C):
            piece_dy[p, c], piece_dotp[p, c] = _piece_grad_sums(dy, m, x, c, n0, n1, i0, i1, np.float64(mean[c]))
    sum_dy = np.zeros(C)
    dotp = np.zeros(C)
    for p in range(npieces):
        _add_piece(sum_dy, piece_dy[p])
        _add_piece(dotp, piece_dotp[p])
    sum_dy_out[:] = sum_dy
    dotp_out[:] = dotp


@kernel
def backward_elementwise_slab(dy, m, x, dres, mean, mean_dy, k, scale, dx, group, nt):
    """dx = (g - mean_dy - (x - mean) * k) * scale per channel of (N, C, L) views, streamed.

    ``g`` is dy masked by the ReLU output ``m`` (or dy if None); ``dres = g``
    unless None.  Tasks as in :func:`normalize_slab`.
    """
    N, C, _ = x.shape
    tasks = (C + group - 1) // group
    for t in prange(N * tasks):
        n = t // tasks
        c0 = (t - n * tasks) * group
        _emit_dx(dy, m, x, dres, mean, mean_dy, k, scale, 0, n, c0, min(C, c0 + group), dx,
                 scratch_for(nt, dx, _STREAM_CHUNK), scratch_for(nt, dres, _STREAM_CHUNK))


# --------------------------------------------------- ROWS, streamed plan ---
@kernel
def stats_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (M, C) view, streamed plan, in float64.

    Each block of rows gets an exact two-pass (mean, M2) while it sits in
    cache; blocks are merged with Chan's formula, first within a chunk, then
    across chunks.
    """
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    nchunks = min(nblocks, _MAX_CHUNKS)
    chunk_count = np.zeros(nchunks, np.int64)
    chunk_mean = np.zeros((nchunks, C))
    chunk_m2 = np.zeros((nchunks, C))
    for k in prange(nchunks):
        block_mean = np.empty(C)
        block_m2 = np.empty(C)
        count = 0
        for b in range(k * nblocks // nchunks, (k + 1) * nblocks // nchunks):
            r0 = b * rows
            r1 = min(M, r0 + rows)
            block_mean[:] = 0.0
            for r in range((r1 - r0) // 2):
                _cols_sum2(x[r0 + 2 * r], x[r0 + 2 * r + 1], block_mean)
            if (r1 - r0) % 2:
                _cols_sum(x[r1 - 1], block_mean)
            for c in range(C):
                block_mean[c] /= r1 - r0
            block_m2[:] = 0.0
            for r in range((r1 - r0) // 2):
                _cols_sum_sq_dev2(x[r0 + 2 * r], x[r0 + 2 * r + 1], block_mean, block_m2)
            if (r1 - r0) % 2:
                _cols_sum_sq_dev(x[r1 - 1], block_mean, block_m2)
            _merge_piece(count, chunk_mean[k], chunk_m2[k], r1 - r0, block_mean, block_m2)
            count += r1 - r0
        chunk_count[k] = count
    for c in prange(C):
        count = 0
        mean = 0.0
        m2 = 0.0
        for k in range(nchunks):
            mean, m2 = _chan_merge(count, mean, m2, chunk_count[k], chunk_mean[k, c], chunk_m2[k, c])
            count += chunk_count[k]
        mean_out[c] = mean
        var_out[c] = m2 / M


@kernel
def normalize_rows(x, z, mean, scale, shift, floor, y, nt):
    """y = max((x - mean) * scale + shift + z, floor) per channel of an (M, C) view; z may be None."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    for b in prange(nblocks):
        r0 = b * rows
        _emit_rows_affine(x, z, mean, scale, shift, floor, r0, min(M, r0 + rows), y,
                          scratch_for(nt, y, _STREAM_CHUNK // C * C + C))


@kernel
def backward_reduce_rows(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (M, C) views, in float64; g is dy masked by m (or dy)."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    nchunks = min(nblocks, _MAX_CHUNKS)
    partial_sum_dy = np.zeros((nchunks, C))
    partial_dotp = np.zeros((nchunks, C))
    for k in prange(nchunks):
        r_lo = (k * nblocks // nchunks) * rows
        r_hi = min(M, ((k + 1) * nblocks // nchunks) * rows)
        for r in range((r_hi - r_lo) // 2):
            a = r_lo + 2 * r
            _cols_grad_sums2(dy[a], part(m, a), x[a], dy[a + 1], part(m, a + 1), x[a + 1], mean, partial_sum_dy[k],
                             partial_dotp[k])
        if (r_hi - r_lo) % 2:
            _cols_grad_sums(dy[r_hi - 1], part(m, r_hi - 1), x[r_hi - 1], mean, partial_sum_dy[k], partial_dotp[k])
    for c in prange(C):
        sum_dy = 0.0
        dotp = 0.0
        for k in range(nchunks):
            sum_dy += partial_sum_dy[k, c]
            dotp += partial_dotp[k, c]
        sum_dy_out[c] = sum_dy
        dotp_out[c] = dotp


@kernel
def backward_elementwise_rows(dy, m, x, dres, mean, mean_dy, k, scale, dx, nt):
    """dx = (g - mean_dy - (x - mean) * k) * scale per channel of (M, C) views; g, dres as in the SLAB kernel."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    for b in prange(nblocks):
        r0 = b * rows
        size = _STREAM_CHUNK // C * C + C
        _emit_rows_dx(dy, m, x, dres, mean, mean_dy, k, scale, r0, min(M, r0 + rows), dx, scratch_for(nt, dx, size),
                      scratch_for(nt, dres, size))


# ------------------------------------------------------- running stats ---
@kernel
def update_running_kernel(running_mean, running_var, mean, var, momentum, count):
    """PyTorch's update: unbiased variance into running_var, in place."""
    correction = count / (count - 1.0)
    for c in prange(running_mean.shape[0]):
        running_mean[c] = cast_to(
            running_mean, (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
        )
        running_var[c] = cast_to(
            running_var, (1.0 - momentum) * np.float64(running_var[c]) + momentum * var[c] * correction
        )


# ------------------------------------------------- backend entry points ---
# The dispatcher (fastbn._api) calls only these.  Each takes layout views from
# fastbn._layout and per-channel arrays in the statistics dtype.


def _mincore():
    """libc's mincore(2), or None where it cannot be called."""
    try:
        function = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_MINCORE = _mincore()


def untouched(array):
    """Whether ``array``'s memory was never written: a fresh mapping the OS must still zero.

    Large ``np.empty`` results are fresh ``mmap`` regions: their first write
    page-faults, and the kernel zeroes each page before handing it over.
    Probes the middle page with mincore(2); False for small arrays (they come
    from the heap and mostly reuse memory), or where mincore is unavailable.
    """
    if _MINCORE is None or array.nbytes < _FRESH_PROBE_BYTES:
        return False
    address = array.ctypes.data + array.nbytes // 2
    page = address - address % mmap.PAGESIZE
    resident = ctypes.c_ubyte(0)
    if _MINCORE(page, mmap.PAGESIZE, ctypes.byref(resident)) != 0:
        return False
    return not resident.value & 1


def plan(layout, x, tensors=1, out=None):
    """Which plan an operation on the kernel view ``x`` runs.

    Parameters
    ----------
    layout : str
        ``SLAB`` or ``ROWS``.
    x : numpy.ndarray
        The kernel view.
    tensors : int, default 1
        Inputs the operation reads: 1 for statistics and forward, 2 for the
        training backward (x and dy).
    out : numpy.ndarray, optional
        The output the operation writes, if any.

    Returns
    -------
    tuple of (str, int)
        ``("fused", channels per task)`` or ``("streamed", 0)``.

    Notes
    -----
    ``ROWS`` always streams: a channel's elements lie one per row, so caching
    a block of channels means reading narrow strided columns, which on a
    power-of-two row length also collide in the same cache sets (measured 3x
    slower than streaming whole rows).

    ``SLAB`` fuses when a task's channels fit in cache and ``out`` is memory
    already in use.  When ``out`` is an untouched mapping (a large fresh
    ``np.empty``, which is what the public functions allocate), the OS zeroes
    each output page on first write, and the fused plan, which writes a
    channel at a time across the whole output, finds the zeroed lines already
    evicted: each output line then costs a zero-fill write, a read and a
    write.  The streamed plan writes the output in order, over lines zeroed an
    instant before, and wins although it reads x twice (measured 10-30% faster
    on fresh outputs; fused is 10-30% faster on reused ones).  Statistics
    alone (no ``out``) stream, which measured as fast or faster.  Short runs
    (under ``_FUSE_RUN_BYTES``: images of 28 x 28 float32 and smaller) stream
    too: a fused task reads and writes its channels in pieces of a few KiB
    scattered across the tensor, and the streamed plan's two passes in memory
    order were faster, though they move more bytes.  With few channels or a
    tiny batch, the plan with more parallel tasks wins instead.
    Both plans give bit-identical results, so the choice never changes an
    answer.
    """
    if layout == ROWS:
        return "streamed", 0
    group = _slab_group(x.shape, x.itemsize, tensors)
    if group == 0:
        return "streamed", 0
    N, C, L = x.shape
    fused_tasks = (C + group - 1) // group
    streamed_tasks = _slab_pieces.py_func(N, L)[2]
    if min(fused_tasks, streamed_tasks) < _MIN_TASKS:
        # Few channels or a tiny batch: take the plan that keeps more cores busy.
        return ("fused", group) if fused_tasks >= streamed_tasks else ("streamed", 0)
    if L * x.itemsize < _FUSE_RUN_BYTES or out is None or untouched(out):
        return "streamed", 0
    return "fused", group


def _one_run(layout, *views):
    """A single-channel ROWS view ``(M, 1)`` as the SLAB view ``(1, 1, M)``.

    With one channel, "channels last" is one contiguous run, which the SLAB
    kernels stream; the ROWS kernels would loop once per element.  Optional
    views (None) stay None.
    """
    if layout == ROWS and views[0].shape[1] == 1:
        return (SLAB, *(None if view is None else view.reshape(1, 1, -1) for view in views))
    return (layout, *views)


def nontemporal(out):
    """The kernels' ``nt`` argument for writing ``out``: a 0-length array of its dtype to stream it, else None."""
    return np.empty(0, out.dtype) if out.nbytes >= _NONTEMPORAL_BYTES else None


def run_group(layout, x):
    """Channels per task of the streamed SLAB elementwise passes: a run of about _TASK_BYTES, or one channel."""
    if layout == ROWS:
        return 1
    _, channels, inner = x.shape
    return max(1, min(channels, _TASK_BYTES // max(1, inner * x.itemsize)))


def floor_for(dtype, relu):
    """The ``floor`` the elementwise kernels clamp to: 0 for the ReLU, -inf for no activation."""
    return np.dtype(dtype).type(0.0 if relu else -np.inf)


def stats(layout, x):
    """Return per-channel (mean, biased var) as float64 arrays."""
    layout, x = _one_run(layout, x)
    channels = x.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    _, group = plan(layout, x)
    with kernel_guard():
        if layout == ROWS:
            stats_rows(x, mean, var)
        elif group:
            stats_slab(x, group, mean, var)
        else:
            stats_slab_streamed(x, mean, var)
    return mean, var


def normalize(layout, x, mean, scale, shift, y, z=None, relu=False):
    """Write ``max((x - mean) * scale + shift + z, floor)`` into y (z optional, floor 0 with ``relu``)."""
    layout, x, z, y = _one_run(layout, x, z, y)
    floor = floor_for(scale.dtype, relu)
    with kernel_guard():
        if layout == ROWS:
            normalize_rows(x, z, mean, scale, shift, floor, y, nontemporal(y))
        else:
            normalize_slab(x, z, mean, scale, shift, floor, y, run_group(layout, x), nontemporal(y))


def forward_train(layout, x, weight, bias, eps, y, z=None, relu=False, renorm=None):
    """Batch statistics and (activated) output; returns float64 (mean, var, invstd) and (r, d).

    ``weight`` and ``bias`` are arrays in the statistics dtype (ones and zeros
    when the caller gave none).  ``renorm`` is None or ``(running_mean,
    running_var, rmax, dmax)`` for batch renormalization; ``r`` and ``d`` come
    back in the statistics dtype (1 and 0 without it).
    """
    layout, x, z, y = _one_run(layout, x, z, y)
    channels = x.shape[1]
    dtype = weight.dtype
    if renorm is None:
        ren_mean = ren_var = np.zeros(channels, dtype)
        rmax = dmax = 1.0
    else:
        ren_mean, ren_var, rmax, dmax = renorm
    r = np.empty(channels, dtype)
    d = np.empty(channels, dtype)
    invstd = np.empty(channels)
    _, group = plan(layout, x, out=y)
    if not group:
        # Streamed: statistics in one pass over x, then normalise in another.
        mean, var = stats(layout, x)
        used_mean, scale, shift = (np.empty(channels, dtype) for _ in range(3))
        with kernel_guard():
            train_coefficients(mean, var, eps, weight, bias, ren_mean, ren_var, renorm is not None, rmax, dmax,
                               invstd, r, d, used_mean, scale, shift)
        normalize(layout, x, used_mean, scale, shift, y, z, relu)
        return mean, var, invstd, r, d
    mean = np.empty(channels)
    var = np.empty(channels)
    with kernel_guard():
        forward_train_slab(x, z, group, weight, bias, eps, floor_for(dtype, relu), ren_mean, ren_var,
                           renorm is not None, rmax, dmax, y, nontemporal(y), mean, var, invstd, r, d)
    return mean, var, invstd, r, d


def backward_reduce(layout, dy, x, mean, m=None):
    """Return per-channel float64 (sum_g, dotp) with dotp = sum((x - mean) * g).

    ``g`` is ``dy`` where the ReLU output ``m`` is > 0 and 0 elsewhere, or
    ``dy`` when ``m`` is None.
    """
    layout, dy, m, x = _one_run(layout, dy, m, x)
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    with kernel_guard():
        (backward_reduce_rows if layout == ROWS else backward_reduce_slab)(dy, m, x, mean, sum_dy, dotp)
    return sum_dy, dotp


def backward_elementwise(layout, dy, x, mean, mean_dy, k, scale, dx, m=None, dres=None):
    """Write dx = (g - mean_dy - (x - mean) * k) * scale, and ``dres = g`` unless it is None (g as above)."""
    layout, dy, m, x, dres, dx = _one_run(layout, dy, m, x, dres, dx)
    with kernel_guard():
        if layout == ROWS:
            backward_elementwise_rows(dy, m, x, dres, mean, mean_dy, k, scale, dx, nontemporal(dx))
        else:
            backward_elementwise_slab(dy, m, x, dres, mean, mean_dy, k, scale, dx, run_group(layout, x),
                                      nontemporal(dx))


def backward_train(layout, dy, x, mean, invstd, weight, dx, m=None, dres=None):
    """Training-mode gradient: writes dx (and dres), returns float64 (sum_g, dotp); m, dres as above."""
    layout, dy, m, x, dres, dx = _one_run(layout, dy, m, x, dres, dx)
    _, group = plan(layout, x, tensors=2 if m is None else 3, out=dx)
    if not group:
        # Streamed: gradient sums in one pass over (x, dy), dx in another.
        sum_dy, dotp = backward_reduce(layout, dy, x, mean, m)
        count = x.size // x.shape[1]
        mean_dy, k, scale = (np.empty_like(weight) for _ in range(3))
        with kernel_guard():
            dx_coefficients(sum_dy, dotp, invstd, weight, count, mean_dy, k, scale)
        backward_elementwise(layout, dy, x, mean, mean_dy, k, scale, dx, m, dres)
        return sum_dy, dotp
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    with kernel_guard():
        backward_train_slab(dy, m, x, dres, group, mean, invstd, weight, dx, nontemporal(dx), sum_dy, dotp)
    return sum_dy, dotp


def update_running(running_mean, running_var, mean, var, momentum, count):
    """Update running statistics in place from float64 batch statistics."""
    with kernel_guard():
        update_running_kernel(running_mean, running_var, mean, var, float(momentum), float(count))
