"""Welford's update, Chan's merge, the block merges and the per-channel kernels of the CUDA backend.

Precision, from an element to a channel's result:

* within a block, each thread sums ``x - pivot`` and its square over runs
  of at most ``RUN`` elements of a channel, in the accumulation type of
  :func:`accumulator` (float32 for float16 and float32 input, float64 for
  float64), with a per-channel pivot, and folds each run into its (count,
  mean, variance) summary with Chan's formula (a run with an Inf, a NaN or
  squares that overflow is read again with Welford's update, ``welford_add``;
  see :mod:`fastbn.backends.cuda.reductions`, where the error bound is
  derived); threads are merged with Chan's formula, still in that type,
  through warp shuffles and shared memory (:func:`device_numerics`);
* each block writes its (count, mean, variance) to float64 partials, and the
  one-thread-per-channel kernels below merge a channel's partials in
  float64, with the same Chan's formula compiled for float64, then round
  once to the statistics dtype.

The backward reductions take the same route with two plain sums (sum_dy and
dotp) in place of Welford's summary.

Chan's merge is written once, in :func:`device_numerics`; the block merge
and :func:`_merged_stats` both use it.

The one-thread-per-channel kernels are the small per-channel arithmetic
between the big kernels (statistics from partials, the coefficients of the
elementwise kernels, the gradient sums, the running-statistics update),
done on the device so that no statistic travels to the host.  They work in
float64: C * splits operations in all, so the wider type costs nothing.
With ghost batch norm a channel's thread loops over the G groups (virtual
channels g * C + c).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fastbn.backends.cuda.target import cuda, device_function, kernel, shfl_down

__all__ = [
    "MAX_THREADS",
    "WARP_SIZE",
    "accumulator",
    "backward_coefficients",
    "device_numerics",
    "forward_coefficients",
    "normalize_coefficients",
    "stats_merge",
    "update_running",
]

# Compile-time constants of the kernels: changing them means recompiling, so
# unlike the launch sizes of fastbn.backends.cuda.plan they are not for patching.
#: Lanes of a warp, the width of the shuffle merges.
WARP_SIZE = 32
#: Shared-memory arrays are sized for the largest block CUDA allows, so that
#: patching the threads per block never needs a recompilation.
MAX_THREADS = 1024


def accumulator(dtype: npt.DTypeLike) -> type:
    """The accumulation (and elementwise compute) type for input of ``dtype``.

    float32 for float16 and float32, float64 for float64: float32 keeps the
    GPU's full arithmetic rate (float64 runs at 1/32 or 1/64 of it on most
    GPUs) and, with the per-channel pivot of the statistics kernels, loses no
    accuracy that matters; float16 input is never accumulated in half
    precision.
    """
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


class DeviceNumerics(NamedTuple):
    """The device functions of :func:`device_numerics`, for one accumulation type."""

    welford_add: Any
    chan_merge: Any
    block_welford: Any
    block_sum2: Any


@functools.cache
def device_numerics(acc):
    """Welford, Chan and block-merge device functions accumulating in ``acc``.

    Parameters
    ----------
    acc : type
        ``np.float32`` or ``np.float64`` (see :func:`accumulator`).

    Returns
    -------
    DeviceNumerics
        ``welford_add(count, mean, var, value)``: one element into a
        (count, mean, biased variance) summary.  ``chan_merge(count_a,
        mean_a, var_a, count_b, mean_b, var_b)``: two summaries into one.
        ``block_welford(...)`` and ``block_sum2(...)``: a block's summaries,
        or two plain sums, merged per channel column.
    """

    @device_function
    def next_mean(mean, step, value):
        # mean + step, except where that is inf - inf from a non-NaN mean and
        # value: an Inf among finite values (or two Infs of one sign) makes
        # the mean that Inf, as sum / count does (torch's mean), where
        # Welford's ``mean + (value - mean) / n`` would give NaN.
        result = mean + step
        if result != result and mean == mean and value == value:
            result = mean + value
        return result

    @device_function
    def welford_add(count, mean, var, value):
        # Welford's update of (count, mean, biased variance): one pass, no
        # E[x^2] - E[x]^2 cancellation.  Kept as a variance, not as M2 =
        # count * var, so that nothing overflows where the variance itself
        # is finite: the added term is (delta / n) * (value - mean_new),
        # about delta^2 / n.
        count += 1
        inv = acc(1) / acc(count)
        delta = value - mean
        mean = next_mean(mean, delta * inv, value)
        var += (delta * inv) * (value - mean) - var * inv
        return count, mean, var

    @device_function
    def chan_merge(count_a, mean_a, var_a, count_b, mean_b, var_b):
        # Chan et al.'s merge of two (count, mean, var) summaries, stable for
        # any split sizes; never adds sums of squares.  In the variance form
        # var = w_a var_a + w_b var_b + (w_a delta) (w_b delta) every term is
        # at most the result, so it overflows only where the result does.
        if count_b == 0:
            return count_a, mean_a, var_a
        if count_a == 0:
            return count_b, mean_b, var_b
        count = count_a + count_b
        delta = mean_b - mean_a
        w_b = acc(count_b) / acc(count)
        w_a = acc(count_a) / acc(count)
        return count, next_mean(mean_a, delta * w_b, mean_b), w_a * var_a + w_b * var_b + (w_a * delta) * (w_b * delta)

    @device_function
    def block_welford(count, mean, var, width, tid, nthreads, shared_count, shared_mean, shared_var):
        # Threads tid, tid + width, tid + 2 width, ... hold the same channel
        # (width divides the warp size); the block's merged summary of channel
        # column `tid` ends in thread tid < width.  All threads must call this.
        lane = tid % WARP_SIZE
        warp = tid // WARP_SIZE
        offset = WARP_SIZE // 2
        while offset >= width:
            count, mean, var = chan_merge(
                count, mean, var, shfl_down(count, offset), shfl_down(mean, offset), shfl_down(var, offset)
            )
            offset //= 2
        if lane < width:
            shared_count[warp * width + lane] = count
            shared_mean[warp * width + lane] = mean
            shared_var[warp * width + lane] = var
        cuda.syncthreads()
        if warp == 0:
            warps = nthreads // WARP_SIZE
            count = 0
            mean = acc(0)
            var = acc(0)
            w = lane // width
            while w < warps:
                slot = w * width + lane % width
                count, mean, var = chan_merge(count, mean, var, shared_count[slot], shared_mean[slot], shared_var[slot])
                w += WARP_SIZE // width
            offset = WARP_SIZE // 2
            while offset >= width:
                count, mean, var = chan_merge(
                    count, mean, var, shfl_down(count, offset), shfl_down(mean, offset), shfl_down(var, offset)
                )
                offset //= 2
        return count, mean, var

    @device_function
    def block_sum2(first, second, width, tid, nthreads, shared_first, shared_second):
        # block_welford's pattern for two plain sums.
        lane = tid % WARP_SIZE
        warp = tid // WARP_SIZE
        offset = WARP_SIZE // 2
        while offset >= width:
            first += shfl_down(first, offset)
            second += shfl_down(second, offset)
            offset //= 2
        if lane < width:
            shared_first[warp * width + lane] = first
            shared_second[warp * width + lane] = second
        cuda.syncthreads()
        if warp == 0:
            warps = nthreads // WARP_SIZE
            first = acc(0)
            second = acc(0)
            w = lane // width
            while w < warps:
                first += shared_first[w * width + lane % width]
                second += shared_second[w * width + lane % width]
                w += WARP_SIZE // width
            offset = WARP_SIZE // 2
            while offset >= width:
                first += shfl_down(first, offset)
                second += shfl_down(second, offset)
                offset //= 2
        return first, second

    return DeviceNumerics(welford_add, chan_merge, block_welford, block_sum2)


# ------------------------------------------------------- channel kernels ---
# Partials are laid out [split, g * C + c] (see fastbn.backends.cuda.reductions);
# the pivots [g * C + c].
_chan_merge64 = device_numerics(np.float64).chan_merge


@device_function
def _merged_stats(v, partial_count, partial_mean, partial_var, pivot):
    # Mean and biased variance of virtual channel v from its blocks' float64
    # partials, merged in float64 so that the merge adds no rounding to them.
    slots = pivot.size
    count = 0
    mean = 0.0
    var = 0.0
    for split in range(partial_count.size // slots):
        slot = split * slots + v
        count, mean, var = _chan_merge64(count, mean, var, partial_count[slot], partial_mean[slot], partial_var[slot])
    return np.float64(pivot[v]) + mean, var


@device_function
def _sqrt(value):
    # sqrt, NaN for a negative value (a negative device variance is not
    # refused on the host: reading it would synchronise the device), as the
    # hardware's sqrt gives; the simulator's math.sqrt would raise instead.
    if value >= 0:
        return math.sqrt(value)
    return math.nan


@device_function
def _clip(value, low, high):
    # np.clip for one value; NaN passes through.
    if value < low:
        return low
    if value > high:
        return high
    return value


@kernel
def stats_merge(partial_count, partial_mean, partial_m2, pivot, mean_out, var_out):
    """Merge the blocks' partials into per-channel mean and biased variance."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < pivot.size:
        mean_out[c], var_out[c] = _merged_stats(c, partial_count, partial_mean, partial_m2, pivot)


@kernel
def forward_coefficients(
    partial_count,
    partial_mean,
    partial_m2,
    pivot,
    eps,
    weight,
    has_weight,
    bias,
    has_bias,
    renorm,
    running_mean,
    running_var,
    rmax,
    dmax,
    r_out,
    d_out,
    mean64,
    var64,
    saved_mean,
    saved_invstd,
    scale,
    shift,
):
    """Training forward's per-channel step: statistics, saved values and normalize's coefficients.

    Per group g (virtual channel g C + c): the group's mean and invstd, and
    normalize's scale and shift.  ``mean64`` and ``var64`` (length C) get the
    averages over groups of the means and biased variances, for
    update_running.  With ``renorm`` (batch renormalization, G = 1), also
    r = clip(sigma / sigma_running, 1/rmax, rmax) and d = clip((mean -
    running_mean) / sigma_running, -dmax, dmax), from the running statistics
    as they are before update_running (launched after this kernel) changes
    them; then scale = invstd r w and shift = d w + b.
    """
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    channels = mean64.size
    if c < channels:
        groups = pivot.size // channels
        w = np.float64(weight[c]) if has_weight else 1.0
        b = np.float64(bias[c]) if has_bias else 0.0
        mean = 0.0
        var = 0.0
        mean_sum = 0.0
        var_sum = 0.0
        for g in range(groups):
            v = g * channels + c
            mean, var = _merged_stats(v, partial_count, partial_mean, partial_m2, pivot)
            mean_sum += mean
            var_sum += var
            saved_mean[v] = mean
            saved_invstd[v] = 1.0 / _sqrt(var + eps)
            # Normalise with the saved (rounded) mean and invstd, read back
            # from memory, so that backward sees exactly what forward used.
            scale[v] = np.float64(saved_invstd[v]) * w
            shift[v] = b
        mean64[c] = mean_sum / groups
        var64[c] = var_sum / groups
        if renorm:
            sigma_running = _sqrt(np.float64(running_var[c]) + eps)
            r_out[c] = _clip(_sqrt(var + eps) / sigma_running, 1.0 / rmax, rmax)
            d_out[c] = _clip((mean - np.float64(running_mean[c])) / sigma_running, -dmax, dmax)
            # As above: the rounded r and d that backward will be given.
            scale[c] = np.float64(saved_invstd[c]) * np.float64(r_out[c]) * w
            shift[c] = np.float64(d_out[c]) * w + b


@kernel
def normalize_coefficients(mean, var, eps, weight, has_weight, bias, has_bias, saved_mean, saved_invstd, scale, shift):
    """Given statistics to normalize's coefficients; saved_mean is a copy of mean."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < mean.size:
        saved_mean[c] = mean[c]
        saved_invstd[c] = 1.0 / _sqrt(np.float64(var[c]) + eps)
        w = np.float64(weight[c]) if has_weight else 1.0
        scale[c] = np.float64(saved_invstd[c]) * w
        shift[c] = bias[c] if has_bias else 0.0


@kernel
def backward_coefficients(
    partial_sum_dy,
    partial_dotp,
    invstd,
    weight,
    has_weight,
    count,
    batch_stats,
    renorm,
    r,
    d,
    dweight,
    dbias,
    mean_dy,
    k,
    scale,
):
    """Per-channel sums from the partials, then dweight, dbias and backward_elementwise's coefficients.

    Per group g (virtual channel g C + c, ``count`` elements each): sum_dy,
    dotp and the elementwise coefficients; dweight and dbias are summed over
    the groups.  With ``renorm``, r and d are constants of forward's output
    x_hat (r w) + (d w + b): dx is the training formula with weight r w, and
    dweight = r dotp invstd + d sum_dy.
    """
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    channels = dweight.size
    if c < channels:
        slots = invstd.size
        w = np.float64(weight[c]) if has_weight else 1.0
        if renorm:
            w *= np.float64(r[c])
        dotp_invstd = 0.0
        total_dy = 0.0
        for g in range(slots // channels):
            v = g * channels + c
            sum_dy = 0.0
            dotp = 0.0
            for split in range(partial_sum_dy.size // slots):
                sum_dy += partial_sum_dy[split * slots + v]
                dotp += partial_dotp[split * slots + v]
            istd = np.float64(invstd[v])
            dotp_invstd += dotp * istd
            total_dy += sum_dy
            if batch_stats:
                mean_dy[v] = sum_dy / count
                k[v] = dotp * istd * istd / count
            else:  # eval: the statistics are constants, dx = dy * invstd * weight
                mean_dy[v] = 0.0
                k[v] = 0.0
            scale[v] = istd * w
        dweight[c] = np.float64(r[c]) * dotp_invstd + np.float64(d[c]) * total_dy if renorm else dotp_invstd
        dbias[c] = total_dy


@kernel
def update_running(running_mean, running_var, mean, var, momentum, correction):
    """PyTorch's update, in place: running = (1 - m) running + m batch, unbiased variance."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < running_mean.size:
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * var[c] * correction
