"""Numba CPU backend: batch statistics, normalization, gradients, running stats.

Every input reaches this module as a C-contiguous view of one of two shapes
(see :mod:`fastbn._layout`):

* ``SLAB``, shape ``(N, C, L)``: each channel is ``N`` runs of ``L`` contiguous
  elements (NCHW, NCL, NCDHW).  Kernels run channel by channel; the fused
  kernels compute a channel's statistics and then normalise it while its slab
  is still in cache.
* ``ROWS``, shape ``(M, C)``: channels are contiguous (NHWC, ``(N, C)``).
  Kernels stream over fixed blocks of rows, vectorised across channels, and
  merge per-block statistics with Chan's formula.

float16 arrays arrive viewed as ``uint16`` (Numba's CPU target has no float16
type) and are converted in registers with the hardware's half<->single
instructions.  Statistics are accumulated in float64 for every dtype.
Elementwise work is done in the statistics dtype: float32 for float16 and
float32 input, float64 for float64 input.

Work partitions depend only on the shape, never on the thread count, so
results are bit-for-bit reproducible across runs and thread counts.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from fastbn._jit import inline, kernel
from fastbn._layout import ROWS
from fastbn._threading import kernel_guard

# Rows per block in the ROWS pattern: a block of about 16 Ki elements (64 KiB
# in float32) stays in L2 between the two passes of its statistics.
_BLOCK_ELEMENTS = 16384
# At most this many blocks' partial statistics are kept; a fixed number keeps
# the reduction order independent of the thread count.
_MAX_CHUNKS = 64


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
    """Convert ``value`` to the element type stored in ``array``."""


@overload(cast_to, inline="always")
def _cast_to_impl(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: _float_to_half_bits(np.float32(value))
    if array.dtype == types.float32:
        return lambda array, value: np.float32(value)
    return lambda array, value: np.float64(value)


# ------------------------------------------------------------- small math ---
@inline
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries: Chan et al., stable for any split."""
    n = n_a + n_b
    if n_b == 0:
        return mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
    return mean, m2


@inline
def _row_block(M, C):
    """Rows per block and number of blocks for an (M, C) ROWS view."""
    rows = max(1, _BLOCK_ELEMENTS // C)
    return rows, (M + rows - 1) // rows


# ---------------------------------------------------------- SLAB kernels ---
@inline
def _slab_channel_stats(x, c):
    # Two passes (mean, then squared deviations), both accumulated in float64:
    # never E[x^2] - E[x]^2, which cancels when |mean| >> std.
    N, _, L = x.shape
    total = 0.0
    for n in range(N):
        for i in range(L):
            total += load(x[n, c, i])
    mean = total / (N * L)
    m2 = 0.0
    for n in range(N):
        for i in range(L):
            d = load(x[n, c, i]) - mean
            m2 += d * d
    return mean, m2 / (N * L)


@inline
def _slab_channel_normalize(x, y, c, mean, scale, shift):
    N, _, L = x.shape
    for n in range(N):
        for i in range(L):
            y[n, c, i] = cast_to(y, (load(x[n, c, i]) - mean) * scale + shift)


@inline
def _slab_channel_reduce(dy, x, c, mean):
    N, _, L = x.shape
    sum_dy = 0.0
    dotp = 0.0
    for n in range(N):
        for i in range(L):
            g = load(dy[n, c, i])
            sum_dy += g
            dotp += (np.float64(load(x[n, c, i])) - mean) * g
    return sum_dy, dotp


@inline
def _slab_channel_dx(dy, x, dx, c, mean, mean_dy, k, scale):
    N, _, L = x.shape
    for n in range(N):
        for i in range(L):
            centred = load(x[n, c, i]) - mean
            dx[n, c, i] = cast_to(dx, (load(dy[n, c, i]) - mean_dy - centred * k) * scale)


@kernel
def stats_slab(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, in float64."""
    for c in prange(x.shape[1]):
        mean_out[c], var_out[c] = _slab_channel_stats(x, c)


@kernel
def normalize_slab(x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift per channel of an (N, C, L) view."""
    N, C, _ = x.shape
    for j in prange(N * C):
        c = j % C
        n_lo = j // C
        for i in range(x.shape[2]):
            y[n_lo, c, i] = cast_to(y, (load(x[n_lo, c, i]) - mean[c]) * scale[c] + shift[c])


@kernel
def forward_train_slab(x, weight, bias, eps, y, mean_out, var_out, invstd_out):
    """Fused training forward: a channel's statistics, then its output, from cache."""
    for c in prange(x.shape[1]):
        mean, var = _slab_channel_stats(x, c)
        invstd = 1.0 / np.sqrt(var + eps)
        mean_out[c] = mean
        var_out[c] = var
        invstd_out[c] = invstd
        # Normalise with the mean and invstd rounded to the saved dtype, so
        # that backward sees exactly the statistics that forward used.
        used_mean = cast_to(weight, mean)
        scale = cast_to(weight, cast_to(weight, invstd) * np.float64(weight[c]))
        _slab_channel_normalize(x, y, c, used_mean, scale, bias[c])


@kernel
def backward_reduce_slab(dy, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(dy) and sum((x - mean) * dy) of (N, C, L) views, in float64."""
    for c in prange(x.shape[1]):
        sum_dy_out[c], dotp_out[c] = _slab_channel_reduce(dy, x, c, np.float64(mean[c]))


@kernel
def backward_elementwise_slab(dy, x, mean, mean_dy, k, scale, dx):
    """dx = (dy - mean_dy - (x - mean) * k) * scale per channel of (N, C, L) views."""
    N, C, _ = x.shape
    for j in prange(N * C):
        c = j % C
        n = j // C
        for i in range(x.shape[2]):
            centred = load(x[n, c, i]) - mean[c]
            dx[n, c, i] = cast_to(dx, (load(dy[n, c, i]) - mean_dy[c] - centred * k[c]) * scale[c])


@kernel
def backward_train_slab(dy, x, mean, invstd, weight, dx, sum_dy_out, dotp_out):
    """Fused training backward: a channel's reductions, then its dx, from cache."""
    N, C, L = x.shape
    count = N * L
    for c in prange(C):
        sum_dy, dotp = _slab_channel_reduce(dy, x, c, np.float64(mean[c]))
        sum_dy_out[c] = sum_dy
        dotp_out[c] = dotp
        istd = np.float64(invstd[c])
        mean_dy = cast_to(weight, sum_dy / count)
        k = cast_to(weight, dotp * istd * istd / count)
        scale = cast_to(weight, istd * np.float64(weight[c]))
        _slab_channel_dx(dy, x, dx, c, mean[c], mean_dy, k, scale)


# ---------------------------------------------------------- ROWS kernels ---
@kernel
def stats_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (M, C) view, in float64.

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
            for r in range(r0, r1):
                for c in range(C):
                    block_mean[c] += load(x[r, c])
            for c in range(C):
                block_mean[c] /= r1 - r0
            block_m2[:] = 0.0
            for r in range(r0, r1):
                for c in range(C):
                    d = load(x[r, c]) - block_mean[c]
                    block_m2[c] += d * d
            for c in range(C):
                chunk_mean[k, c], chunk_m2[k, c] = _chan_merge(
                    count, chunk_mean[k, c], chunk_m2[k, c], r1 - r0, block_mean[c], block_m2[c]
                )
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
def normalize_rows(x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift per channel of an (M, C) view."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    for b in prange(nblocks):
        for r in range(b * rows, min(M, (b + 1) * rows)):
            for c in range(C):
                y[r, c] = cast_to(y, (load(x[r, c]) - mean[c]) * scale[c] + shift[c])


@kernel
def backward_reduce_rows(dy, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(dy) and sum((x - mean) * dy) of (M, C) views, in float64."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    nchunks = min(nblocks, _MAX_CHUNKS)
    partial_sum_dy = np.zeros((nchunks, C))
    partial_dotp = np.zeros((nchunks, C))
    for k in prange(nchunks):
        r_lo = (k * nblocks // nchunks) * rows
        r_hi = min(M, ((k + 1) * nblocks // nchunks) * rows)
        for r in range(r_lo, r_hi):
            for c in range(C):
                g = load(dy[r, c])
                partial_sum_dy[k, c] += g
                partial_dotp[k, c] += (np.float64(load(x[r, c])) - mean[c]) * g
    for c in prange(C):
        sum_dy = 0.0
        dotp = 0.0
        for k in range(nchunks):
            sum_dy += partial_sum_dy[k, c]
            dotp += partial_dotp[k, c]
        sum_dy_out[c] = sum_dy
        dotp_out[c] = dotp


@kernel
def backward_elementwise_rows(dy, x, mean, mean_dy, k, scale, dx):
    """dx = (dy - mean_dy - (x - mean) * k) * scale per channel of (M, C) views."""
    M, C = x.shape
    rows, nblocks = _row_block(M, C)
    for b in prange(nblocks):
        for r in range(b * rows, min(M, (b + 1) * rows)):
            for c in range(C):
                centred = load(x[r, c]) - mean[c]
                dx[r, c] = cast_to(dx, (load(dy[r, c]) - mean_dy[c] - centred * k[c]) * scale[c])


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


def stats(layout, x):
    """Return per-channel (mean, biased var) as float64 arrays."""
    channels = x.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    with kernel_guard():
        (stats_rows if layout == ROWS else stats_slab)(x, mean, var)
    return mean, var


def normalize(layout, x, mean, scale, shift, y):
    """Write (x - mean) * scale + shift into y."""
    with kernel_guard():
        (normalize_rows if layout == ROWS else normalize_slab)(x, mean, scale, shift, y)


def forward_train(layout, x, weight, bias, eps, y):
    """Batch statistics and normalised output; returns float64 (mean, var, invstd).

    ``weight`` and ``bias`` are arrays in the statistics dtype (ones and zeros
    when the caller gave none).
    """
    if layout == ROWS:
        mean, var = stats(layout, x)
        invstd = 1.0 / np.sqrt(var + eps)
        used_mean = mean.astype(weight.dtype)
        scale = (invstd.astype(weight.dtype) * weight.astype(np.float64)).astype(weight.dtype)
        normalize(layout, x, used_mean, scale, bias, y)
        return mean, var, invstd
    channels = x.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    invstd = np.empty(channels)
    with kernel_guard():
        forward_train_slab(x, weight, bias, eps, y, mean, var, invstd)
    return mean, var, invstd


def backward_reduce(layout, dy, x, mean):
    """Return per-channel float64 (sum_dy, dotp) with dotp = sum((x - mean) * dy)."""
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    with kernel_guard():
        (backward_reduce_rows if layout == ROWS else backward_reduce_slab)(dy, x, mean, sum_dy, dotp)
    return sum_dy, dotp


def backward_elementwise(layout, dy, x, mean, mean_dy, k, scale, dx):
    """Write dx = (dy - mean_dy - (x - mean) * k) * scale."""
    with kernel_guard():
        (backward_elementwise_rows if layout == ROWS else backward_elementwise_slab)(
            dy, x, mean, mean_dy, k, scale, dx
        )


def backward_train(layout, dy, x, mean, invstd, weight, dx):
    """Training-mode gradient: writes dx, returns float64 (sum_dy, dotp)."""
    if layout == ROWS:
        sum_dy, dotp = backward_reduce(layout, dy, x, mean)
        count = x.shape[0]
        istd = invstd.astype(np.float64)
        dtype = weight.dtype
        backward_elementwise(
            layout, dy, x, mean,
            (sum_dy / count).astype(dtype),
            (dotp * istd * istd / count).astype(dtype),
            (istd * weight.astype(np.float64)).astype(dtype),
            dx,
        )
        return sum_dy, dotp
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    with kernel_guard():
        backward_train_slab(dy, x, mean, invstd, weight, dx, sum_dy, dotp)
    return sum_dy, dotp


def update_running(running_mean, running_var, mean, var, momentum, count):
    """Update running statistics in place from float64 batch statistics."""
    with kernel_guard():
        update_running_kernel(running_mean, running_var, mean, var, float(momentum), float(count))
