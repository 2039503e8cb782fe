"""The CUDA backend's reductions: per-block statistics and gradient sums.

Every input reaches these kernels as a flat, contiguous 1-D device array in
one of the two memory patterns of :mod:`fastbn._layout`:

* ``SLAB``, ``(outer, C, inner)``: each channel is ``outer`` runs of ``inner``
  contiguous elements (NCHW, NCL, NCDHW);
* ``ROWS``, ``(rows, C)``: channels are contiguous (NHWC, ``(N, C)``,
  PyTorch ``channels_last``); the same as ``SLAB`` with ``inner == 1``.

Kernels
-------
``stats_slab`` / ``stats_rows``
    Each thread runs Welford's update over its share of a channel, in the
    accumulation type (float32 for float16 and float32 input, float64 for
    float64) on ``x - pivot``, the pivot being the channel's first element
    (in its group, with ghost batches; 0 if that is not finite); the block's threads are merged with
    Chan's formula through warp shuffles, then through shared memory, still
    in that type, giving one (count, mean - pivot, var) per block, written to
    float64 partials.  A channel with many elements is split over several
    blocks (``splits``, the grid's y extent), so a small C still fills the
    GPU; ``stats_merge`` or ``forward_coefficients``
    (:mod:`fastbn.backends.cuda.numerics`) merge a channel's partials in
    float64.
``backward_reduce_slab`` / ``backward_reduce_rows`` (``_masked``)
    The same structure for ``sum_dy`` and ``dotp = sum((x - mean) * dy)``,
    with forward's saved mean: plain sums in the accumulation type within a
    block, float64 partials.  The ``_masked`` variants use the gradient
    behind a ReLU, dy where the forward output y > 0.

SLAB kernels give each block one channel (blockIdx.x) and 1-D blocks; ROWS
kernels give each block a tile of channels: threadIdx.x walks ``width``
channels, threadIdx.y rows, so that a warp reads a contiguous run of memory
even when C is small.  The launch shapes are chosen in
:mod:`fastbn.backends.cuda.plan`.

Indexing is 64-bit throughout: every index is an int64 built from the block
index *before* it is multiplied (``np.int64(blockIdx.x) * blockDim.x``), and
array sizes are int64 in Numba, so arrays of more than 2**31 elements work.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fastbn.backends.cuda.numerics import MAX_THREADS, device_numerics
from fastbn.backends.cuda.target import cuda, device_function, kernel, named_kernel

__all__ = ["backward_reduce_kernels", "gradient", "stats_kernels"]

# Ghost batch norm splits x into G groups, each one contiguous 1/G of the flat
# array (the samples g N / G ... along axis 0, which comes first in both
# layouts).  The reductions treat every (group, channel) pair as a channel of
# its own, "virtual channel" g * C + c, with the group in blockIdx.z (offset by
# ``first_group``: gridDim.z is at most 65535).  Partials are laid out
# [split, g * C + c].  G = 1 is plain batch norm.


@device_function
def _slab_walk(j, nthreads, c, channels, inner, start):
    # Element j of channel c in the (rows, C, inner) block that starts at flat
    # index `start`, and how a step of nthreads elements moves it: the flat
    # index is carried along with i = j % inner instead of being divided out
    # of j for every element.
    row_stride = channels * inner
    i = j % inner
    rows_step = nthreads // inner
    i_step = nthreads - rows_step * inner
    return i, start + (j // inner) * row_stride + c * inner + i, i_step, rows_step * row_stride + i_step


@device_function
def _slab_next(i, index, i_step, index_step, channels, inner):
    # One step of the walk _slab_walk set up.
    i += i_step
    index += index_step
    if i >= inner:
        i -= inner
        index += (channels - 1) * inner
    return i, index


@device_function
def finite_or_zero(value, zero):
    # ``value`` if it is finite, else ``zero``.
    if math.isinf(value) or math.isnan(value):
        return zero
    return value


@functools.cache
def stats_kernels(acc):
    """stats_slab and stats_rows, accumulating in ``acc`` (see :func:`~fastbn.backends.cuda.numerics.accumulator`)."""
    numerics = device_numerics(acc)
    welford_add, block_welford = numerics.welford_add, numerics.block_welford

    @kernel
    def stats_slab(
        x, channels, inner, group_size, first_group, chunk, partial_count, partial_mean, partial_m2, pivot_out
    ):
        """Per-block (count, mean - pivot, var) of an (outer, C, inner) x: channel blockIdx.x, split
        blockIdx.y, group first_group + blockIdx.z (group_size elements each)."""
        shared_count = cuda.shared.array(MAX_THREADS, np.int64)
        shared_mean = cuda.shared.array(MAX_THREADS, acc)
        shared_m2 = cuda.shared.array(MAX_THREADS, acc)
        c = np.int64(cuda.blockIdx.x)
        split = np.int64(cuda.blockIdx.y)
        group = first_group + np.int64(cuda.blockIdx.z)
        tid = np.int64(cuda.threadIdx.x)
        nthreads = np.int64(cuda.blockDim.x)
        start = group * group_size
        # Accumulate x - pivot, the pivot being the channel's first element:
        # the accumulator then holds values of the size of the spread, not of
        # the mean, so float32 stays accurate on data whose mean is far above
        # its spread (the cancellation behind flax#1491).
        # The pivot is 0 where that element is not finite (x - inf would make
        # every deviation NaN).
        pivot = finite_or_zero(acc(x[start + c * inner]), acc(0))
        count = np.int64(0)
        mean = acc(0)
        m2 = acc(0)
        j = split * chunk + tid  # element j of the channel in the group
        end = min(group_size // channels, (split + 1) * chunk)
        i, index, i_step, index_step = _slab_walk(j, nthreads, c, channels, inner, start)
        while j < end:
            count, mean, m2 = welford_add(count, mean, m2, acc(x[index]) - pivot)
            j += nthreads
            i, index = _slab_next(i, index, i_step, index_step, channels, inner)
        count, mean, m2 = block_welford(count, mean, m2, 1, tid, nthreads, shared_count, shared_mean, shared_m2)
        if tid == 0:
            slot = group * channels + c
            partial_count[split * pivot_out.size + slot] = count
            partial_mean[split * pivot_out.size + slot] = mean
            partial_m2[split * pivot_out.size + slot] = m2
            if split == 0:
                pivot_out[slot] = pivot

    @kernel
    def stats_rows(
        x, channels, group_size, first_group, rows_per_split, partial_count, partial_mean, partial_m2, pivot_out
    ):
        """Per-block (count, mean - pivot, var) of a (rows, C) x; threadIdx.x walks channels, threadIdx.y
        rows, blockIdx.z groups."""
        shared_count = cuda.shared.array(MAX_THREADS, np.int64)
        shared_mean = cuda.shared.array(MAX_THREADS, acc)
        shared_m2 = cuda.shared.array(MAX_THREADS, acc)
        width = np.int64(cuda.blockDim.x)
        height = np.int64(cuda.blockDim.y)
        ty = np.int64(cuda.threadIdx.y)
        tid = ty * width + cuda.threadIdx.x
        c = np.int64(cuda.blockIdx.x) * width + cuda.threadIdx.x
        split = np.int64(cuda.blockIdx.y)
        group = first_group + np.int64(cuda.blockIdx.z)
        start = group * group_size
        count = np.int64(0)
        mean = acc(0)
        m2 = acc(0)
        pivot = acc(0)
        if c < channels:
            pivot = finite_or_zero(acc(x[start + c]), acc(0))  # see stats_slab
            row = split * rows_per_split + ty
            end = min(group_size // channels, (split + 1) * rows_per_split)
            index = start + row * channels + c
            while row < end:
                count, mean, m2 = welford_add(count, mean, m2, acc(x[index]) - pivot)
                row += height
                index += height * channels
        count, mean, m2 = block_welford(
            count, mean, m2, width, tid, width * height, shared_count, shared_mean, shared_m2
        )
        if ty == 0 and c < channels:
            slot = group * channels + c
            partial_count[split * pivot_out.size + slot] = count
            partial_mean[split * pivot_out.size + slot] = mean
            partial_m2[split * pivot_out.size + slot] = m2
            if split == 0:
                pivot_out[slot] = pivot

    return stats_slab, stats_rows


@functools.cache
def gradient(acc, masked):
    """Device function: the gradient at the normalisation's output, element ``index``.

    Without ``masked`` it is dy.  With ``masked`` (the backward of a ReLU,
    ``y`` being forward's output) it is dy where y > 0 and 0 elsewhere, y NaN
    included: a select, not dy * (y > 0), so that an Inf or NaN in dy where
    the ReLU was closed is dropped, as PyTorch drops it.  Without ``masked``,
    ``y`` is never read (the caller passes any array of dy's type).
    """

    @device_function
    def gradient_at(dy, y, index):
        grad = acc(dy[index])
        if masked and not acc(y[index]) > 0:
            grad = acc(0)
        return grad

    return gradient_at


@functools.cache
def backward_reduce_kernels(acc, masked):
    """backward_reduce_slab and backward_reduce_rows (``_masked``), on the gradient of :func:`gradient`."""
    block_sum2 = device_numerics(acc).block_sum2
    gradient_at = gradient(acc, masked)
    suffix = "_masked" if masked else ""

    @named_kernel("backward_reduce_slab" + suffix)
    def backward_reduce_slab(
        dy, x, y, mean, channels, inner, group_size, first_group, chunk, partial_sum_dy, partial_dotp
    ):
        """Per-block sum(g) and sum((x - mean) * g) of channel blockIdx.x, split blockIdx.y, group
        first_group + blockIdx.z; g is dy, masked by y > 0 if ``masked``."""
        shared_sum_dy = cuda.shared.array(MAX_THREADS, acc)
        shared_dotp = cuda.shared.array(MAX_THREADS, acc)
        c = np.int64(cuda.blockIdx.x)
        split = np.int64(cuda.blockIdx.y)
        group = first_group + np.int64(cuda.blockIdx.z)
        tid = np.int64(cuda.threadIdx.x)
        nthreads = np.int64(cuda.blockDim.x)
        slot = group * channels + c
        channel_mean = acc(mean[slot])
        sum_dy = acc(0)
        dotp = acc(0)
        j = split * chunk + tid
        end = min(group_size // channels, (split + 1) * chunk)
        i, index, i_step, index_step = _slab_walk(j, nthreads, c, channels, inner, group * group_size)
        while j < end:
            grad = gradient_at(dy, y, index)
            sum_dy += grad
            dotp += (acc(x[index]) - channel_mean) * grad
            j += nthreads
            i, index = _slab_next(i, index, i_step, index_step, channels, inner)
        sum_dy, dotp = block_sum2(sum_dy, dotp, 1, tid, nthreads, shared_sum_dy, shared_dotp)
        if tid == 0:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    @named_kernel("backward_reduce_rows" + suffix)
    def backward_reduce_rows(
        dy, x, y, mean, channels, group_size, first_group, rows_per_split, partial_sum_dy, partial_dotp
    ):
        """Per-block sum(g) and sum((x - mean) * g) of (rows, C) views, blockIdx.z the group."""
        shared_sum_dy = cuda.shared.array(MAX_THREADS, acc)
        shared_dotp = cuda.shared.array(MAX_THREADS, acc)
        width = np.int64(cuda.blockDim.x)
        height = np.int64(cuda.blockDim.y)
        ty = np.int64(cuda.threadIdx.y)
        tid = ty * width + cuda.threadIdx.x
        c = np.int64(cuda.blockIdx.x) * width + cuda.threadIdx.x
        split = np.int64(cuda.blockIdx.y)
        group = first_group + np.int64(cuda.blockIdx.z)
        slot = group * channels + c
        sum_dy = acc(0)
        dotp = acc(0)
        if c < channels:
            channel_mean = acc(mean[slot])
            row = split * rows_per_split + ty
            end = min(group_size // channels, (split + 1) * rows_per_split)
            index = group * group_size + row * channels + c
            while row < end:
                grad = gradient_at(dy, y, index)
                sum_dy += grad
                dotp += (acc(x[index]) - channel_mean) * grad
                row += height
                index += height * channels
        sum_dy, dotp = block_sum2(sum_dy, dotp, width, tid, width * height, shared_sum_dy, shared_dotp)
        if ty == 0 and c < channels:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    return backward_reduce_slab, backward_reduce_rows
