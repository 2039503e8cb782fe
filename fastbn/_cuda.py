"""CUDA backend kernels: batch statistics, normalization, gradients, running stats.

The GPU mirror of :mod:`fastbn._cpu`.  Every input reaches these kernels as a
flat, contiguous 1-D device array in one of the two memory patterns of
:mod:`fastbn._layout`:

* ``SLAB``, ``(outer, C, inner)``: each channel is ``outer`` runs of ``inner``
  contiguous elements (NCHW, NCL, NCDHW);
* ``ROWS``, ``(rows, C)``: channels are contiguous (NHWC, ``(N, C)``,
  PyTorch ``channels_last``); the same as ``SLAB`` with ``inner == 1``.

Kernels
-------
``stats_slab`` / ``stats_rows``
    Each thread runs Welford's update over its share of a channel; threads are
    merged with Chan's formula through warp shuffles, then through shared
    memory, giving one (count, mean, M2) per block.  A channel with many
    elements is split over several blocks (``splits``, the grid's y extent),
    so a small C still fills the GPU; ``stats_merge`` (or
    ``forward_coefficients``) merges the blocks' partials per channel.
``backward_reduce_slab`` / ``backward_reduce_rows``
    The same structure for ``sum_dy`` and ``dotp = sum((x - mean) * dy)``.
``normalize`` / ``backward_elementwise``
    Elementwise, grid-stride loops over the flat array; one kernel serves
    both patterns because the channel index is carried along incrementally
    instead of being divided out of the flat index for every element.
``forward_coefficients``, ``normalize_coefficients``, ``backward_coefficients``, ``update_running``
    One thread per channel: the small per-channel arithmetic between the big
    kernels, done on the device so that no statistic travels to the host.
``gather``
    Copies a strided input that fits neither pattern into a contiguous one.

Indexing is 64-bit throughout: every index is an int64 built from the block
index *before* it is multiplied (``np.int64(blockIdx.x) * blockDim.x``), and
array sizes are int64 in Numba, so arrays of more than 2**31 elements work.

Launch sizes are module attributes read at every launch, so tests can patch
them small (the CUDA simulator runs a Python thread per CUDA thread) and still
reach the multi-warp and multi-block paths.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fastbn._cuda_target import cuda, device_function, kernel, shfl_down, types

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

WARP_SIZE = 32
#: Shared-memory arrays are sized for the largest block CUDA allows, so that
#: patching THREADS_PER_BLOCK never needs a recompilation.
MAX_THREADS = 1024
#: Dimensions (after dropping and merging what can be) that ``gather`` handles.
GATHER_RANK = 8

#: Tests set this to a list to record every launch as (kernel name, grid, block, args).
LAUNCH_LOG = None


# --------------------------------------------------------------- numerics ---
@functools.cache
def _numerics(acc):
    """Welford, Chan and block-merge device functions accumulating in ``acc``.

    ``acc`` is ``np.float32`` for float16 and float32 input and ``np.float64``
    for float64 input: float32 keeps the GPU's full arithmetic rate (float64
    runs at 1/32 or 1/64 of it on most GPUs) and, with the per-channel pivot
    of the statistics kernels, loses no accuracy that matters; float16 input
    is never accumulated in half precision.
    """

    @device_function
    def welford_add(count, mean, m2, value):
        # Welford: one pass, no E[x^2] - E[x]^2 cancellation.
        count += 1
        delta = value - mean
        mean += delta / acc(count)
        m2 += delta * (value - mean)
        return count, mean, m2

    @device_function
    def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
        # Chan et al.: exact merge of two (count, mean, M2) summaries, stable
        # for any split sizes; never adds sums of squares.
        if count_b == 0:
            return count_a, mean_a, m2_a
        count = count_a + count_b
        delta = mean_b - mean_a
        ratio = acc(count_b) / acc(count)
        return count, mean_a + delta * ratio, m2_a + m2_b + delta * delta * acc(count_a) * ratio

    @device_function
    def block_welford(count, mean, m2, width, tid, nthreads, shared_count, shared_mean, shared_m2):
        # Threads tid, tid + width, tid + 2 width, ... hold the same channel
        # (width divides the warp size); the block's merged summary of channel
        # column `tid` ends in thread tid < width.  All threads must call this.
        lane = tid % WARP_SIZE
        warp = tid // WARP_SIZE
        offset = WARP_SIZE // 2
        while offset >= width:
            count, mean, m2 = chan_merge(
                count, mean, m2, shfl_down(count, offset), shfl_down(mean, offset), shfl_down(m2, offset)
            )
            offset //= 2
        if lane < width:
            shared_count[warp * width + lane] = count
            shared_mean[warp * width + lane] = mean
            shared_m2[warp * width + lane] = m2
        cuda.syncthreads()
        if warp == 0:
            warps = nthreads // WARP_SIZE
            count = 0
            mean = acc(0)
            m2 = acc(0)
            w = lane // width
            while w < warps:
                slot = w * width + lane % width
                count, mean, m2 = chan_merge(count, mean, m2, shared_count[slot], shared_mean[slot], shared_m2[slot])
                w += WARP_SIZE // width
            offset = WARP_SIZE // 2
            while offset >= width:
                count, mean, m2 = chan_merge(
                    count, mean, m2, shfl_down(count, offset), shfl_down(mean, offset), shfl_down(m2, offset)
                )
                offset //= 2
        return count, mean, m2

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

    return welford_add, chan_merge, block_welford, block_sum2


def accumulator(dtype):
    """The accumulation (and elementwise compute) type for input of ``dtype``."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# ----------------------------------------------------- reduction kernels ---
@functools.cache
def _reduction_kernels(acc):
    welford_add, _, block_welford, block_sum2 = _numerics(acc)

    @kernel
    def stats_slab(x, channels, inner, chunk, partial_count, partial_mean, partial_m2, pivot_out):
        """Per-block (count, mean - pivot, M2) of channel blockIdx.x, split blockIdx.y, of an (outer, C, inner) x."""
        shared_count = cuda.shared.array(MAX_THREADS, np.int64)
        shared_mean = cuda.shared.array(MAX_THREADS, acc)
        shared_m2 = cuda.shared.array(MAX_THREADS, acc)
        c = np.int64(cuda.blockIdx.x)
        split = np.int64(cuda.blockIdx.y)
        tid = np.int64(cuda.threadIdx.x)
        nthreads = np.int64(cuda.blockDim.x)
        # Accumulate x - pivot, the pivot being the channel's first element:
        # the accumulator then holds values of the size of the spread, not of
        # the mean, so float32 stays accurate on data whose mean is far above
        # its spread (the cancellation behind flax#1491).
        pivot = acc(x[c * inner])
        count = np.int64(0)
        mean = acc(0)
        m2 = acc(0)
        j = split * chunk + tid  # element j of the channel is (j // inner, c, j % inner)
        end = min(x.size // channels, (split + 1) * chunk)
        if j < end:
            row_stride = channels * inner
            i = j % inner
            index = (j // inner) * row_stride + c * inner + i
            # Carry (row, i) along instead of dividing every element's j.
            rows_step = nthreads // inner
            i_step = nthreads - rows_step * inner
            while j < end:
                count, mean, m2 = welford_add(count, mean, m2, acc(x[index]) - pivot)
                j += nthreads
                i += i_step
                index += rows_step * row_stride + i_step
                if i >= inner:
                    i -= inner
                    index += row_stride - inner
        count, mean, m2 = block_welford(count, mean, m2, 1, tid, nthreads, shared_count, shared_mean, shared_m2)
        if tid == 0:
            partial_count[split * channels + c] = count
            partial_mean[split * channels + c] = mean
            partial_m2[split * channels + c] = m2
            if split == 0:
                pivot_out[c] = pivot

    @kernel
    def stats_rows(x, channels, rows_per_split, partial_count, partial_mean, partial_m2, pivot_out):
        """Per-block (count, mean - pivot, M2) of a (rows, C) x; threadIdx.x walks channels, threadIdx.y rows."""
        shared_count = cuda.shared.array(MAX_THREADS, np.int64)
        shared_mean = cuda.shared.array(MAX_THREADS, acc)
        shared_m2 = cuda.shared.array(MAX_THREADS, acc)
        width = np.int64(cuda.blockDim.x)
        height = np.int64(cuda.blockDim.y)
        ty = np.int64(cuda.threadIdx.y)
        tid = ty * width + cuda.threadIdx.x
        c = np.int64(cuda.blockIdx.x) * width + cuda.threadIdx.x
        split = np.int64(cuda.blockIdx.y)
        count = np.int64(0)
        mean = acc(0)
        m2 = acc(0)
        pivot = acc(0)
        if c < channels:
            pivot = acc(x[c])  # see stats_slab
            row = split * rows_per_split + ty
            end = min(x.size // channels, (split + 1) * rows_per_split)
            index = row * channels + c
            while row < end:
                count, mean, m2 = welford_add(count, mean, m2, acc(x[index]) - pivot)
                row += height
                index += height * channels
        count, mean, m2 = block_welford(
            count, mean, m2, width, tid, width * height, shared_count, shared_mean, shared_m2
        )
        if ty == 0 and c < channels:
            partial_count[split * channels + c] = count
            partial_mean[split * channels + c] = mean
            partial_m2[split * channels + c] = m2
            if split == 0:
                pivot_out[c] = pivot

    @kernel
    def backward_reduce_slab(dy, x, mean, channels, inner, chunk, partial_sum_dy, partial_dotp):
        """Per-block sum(dy) and sum((x - mean) * dy) of channel blockIdx.x, split blockIdx.y."""
        shared_sum_dy = cuda.shared.array(MAX_THREADS, acc)
        shared_dotp = cuda.shared.array(MAX_THREADS, acc)
        c = np.int64(cuda.blockIdx.x)
        split = np.int64(cuda.blockIdx.y)
        tid = np.int64(cuda.threadIdx.x)
        nthreads = np.int64(cuda.blockDim.x)
        channel_mean = acc(mean[c])
        sum_dy = acc(0)
        dotp = acc(0)
        j = split * chunk + tid
        end = min(x.size // channels, (split + 1) * chunk)
        if j < end:
            row_stride = channels * inner
            i = j % inner
            index = (j // inner) * row_stride + c * inner + i
            rows_step = nthreads // inner
            i_step = nthreads - rows_step * inner
            while j < end:
                grad = acc(dy[index])
                sum_dy += grad
                dotp += (acc(x[index]) - channel_mean) * grad
                j += nthreads
                i += i_step
                index += rows_step * row_stride + i_step
                if i >= inner:
                    i -= inner
                    index += row_stride - inner
        sum_dy, dotp = block_sum2(sum_dy, dotp, 1, tid, nthreads, shared_sum_dy, shared_dotp)
        if tid == 0:
            partial_sum_dy[split * channels + c] = sum_dy
            partial_dotp[split * channels + c] = dotp

    @kernel
    def backward_reduce_rows(dy, x, mean, channels, rows_per_split, partial_sum_dy, partial_dotp):
        """Per-block sum(dy) and sum((x - mean) * dy) of (rows, C) views."""
        shared_sum_dy = cuda.shared.array(MAX_THREADS, acc)
        shared_dotp = cuda.shared.array(MAX_THREADS, acc)
        width = np.int64(cuda.blockDim.x)
        height = np.int64(cuda.blockDim.y)
        ty = np.int64(cuda.threadIdx.y)
        tid = ty * width + cuda.threadIdx.x
        c = np.int64(cuda.blockIdx.x) * width + cuda.threadIdx.x
        split = np.int64(cuda.blockIdx.y)
        sum_dy = acc(0)
        dotp = acc(0)
        if c < channels:
            channel_mean = acc(mean[c])
            row = split * rows_per_split + ty
            end = min(x.size // channels, (split + 1) * rows_per_split)
            index = row * channels + c
            while row < end:
                grad = acc(dy[index])
                sum_dy += grad
                dotp += (acc(x[index]) - channel_mean) * grad
                row += height
                index += height * channels
        sum_dy, dotp = block_sum2(sum_dy, dotp, width, tid, width * height, shared_sum_dy, shared_dotp)
        if ty == 0 and c < channels:
            partial_sum_dy[split * channels + c] = sum_dy
            partial_dotp[split * channels + c] = dotp

    return stats_slab, stats_rows, backward_reduce_slab, backward_reduce_rows


# --------------------------------------------------- elementwise kernels ---
@functools.cache
def _elementwise_kernels(acc):
    @kernel
    def normalize(x, inner, mean, scale, shift, y):
        """y = (x - mean) * scale + shift per channel; x and y flat, (outer, C, inner) order."""
        channels = mean.size
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        if index < x.size:
            # Channel of the flat index, then carried along the grid-stride
            # loop: one division per thread, none per element.
            i = index % inner
            c = (index // inner) % channels
            rows_step = step // inner
            i_step = step - rows_step * inner
            c_step = rows_step % channels
            while index < x.size:
                y[index] = (acc(x[index]) - mean[c]) * scale[c] + shift[c]
                index += step
                i += i_step
                c += c_step
                if i >= inner:
                    i -= inner
                    c += 1
                if c >= channels:
                    c -= channels

    @kernel
    def backward_elementwise(dy, x, inner, mean, mean_dy, k, scale, dx):
        """dx = (dy - mean_dy - (x - mean) * k) * scale per channel; flat, (outer, C, inner) order."""
        channels = mean.size
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        if index < x.size:
            i = index % inner
            c = (index // inner) % channels
            rows_step = step // inner
            i_step = step - rows_step * inner
            c_step = rows_step % channels
            while index < x.size:
                centred = acc(x[index]) - mean[c]
                dx[index] = (acc(dy[index]) - mean_dy[c] - centred * k[c]) * scale[c]
                index += step
                i += i_step
                c += c_step
                if i >= inner:
                    i -= inner
                    c += 1
                if c >= channels:
                    c -= channels

    return normalize, backward_elementwise


@kernel
def gather(source, start, shape, strides, destination):
    """destination[:] = the strided array whose element [0, ..., 0] is source[start], in C order.

    ``shape`` and ``strides`` (in elements, possibly negative) are tuples of
    GATHER_RANK entries, padded in front with extent-1 dimensions.
    """
    index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
    while index < destination.size:
        remainder = index
        offset = start
        for d in range(GATHER_RANK - 1, -1, -1):
            quotient = remainder // shape[d]
            offset += (remainder - quotient * shape[d]) * strides[d]
            remainder = quotient
        destination[index] = source[offset]
        index += step


# ------------------------------------------------------- channel kernels ---
# One thread per channel.  They read the float64 partials and do all their
# arithmetic in float64: C * splits operations in all, so the wider type costs
# nothing and the merge adds no rounding to the blocks' results.
_, _chan_merge64, _, _ = _numerics(np.float64)


@device_function
def _merged_stats(c, partial_count, partial_mean, partial_m2, pivot):
    channels = pivot.size
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for split in range(partial_count.size // channels):
        slot = split * channels + c
        count, mean, m2 = _chan_merge64(count, mean, m2, partial_count[slot], partial_mean[slot], partial_m2[slot])
    return np.float64(pivot[c]) + mean, m2 / count


@kernel
def stats_merge(partial_count, partial_mean, partial_m2, pivot, mean_out, var_out):
    """Merge the blocks' partials into per-channel mean and biased variance."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < pivot.size:
        mean_out[c], var_out[c] = _merged_stats(c, partial_count, partial_mean, partial_m2, pivot)


@kernel
def forward_coefficients(partial_count, partial_mean, partial_m2, pivot, eps, weight, has_weight, bias, has_bias,
                         mean64, var64, saved_mean, saved_invstd, scale, shift):
    """Training forward's per-channel step: statistics, saved values and normalize's coefficients."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < pivot.size:
        mean, var = _merged_stats(c, partial_count, partial_mean, partial_m2, pivot)
        mean64[c] = mean
        var64[c] = var
        saved_mean[c] = mean
        saved_invstd[c] = 1.0 / math.sqrt(var + eps)
        # Normalise with the saved (rounded) mean and invstd, read back from
        # memory, so that backward sees exactly the statistics forward used.
        w = np.float64(weight[c]) if has_weight else 1.0
        scale[c] = np.float64(saved_invstd[c]) * w
        shift[c] = bias[c] if has_bias else 0.0


@kernel
def normalize_coefficients(mean, var, eps, weight, has_weight, bias, has_bias, saved_mean, saved_invstd, scale, shift):
    """Given statistics to normalize's coefficients; saved_mean is a copy of mean."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < mean.size:
        saved_mean[c] = mean[c]
        saved_invstd[c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
        w = np.float64(weight[c]) if has_weight else 1.0
        scale[c] = np.float64(saved_invstd[c]) * w
        shift[c] = bias[c] if has_bias else 0.0


@kernel
def backward_coefficients(partial_sum_dy, partial_dotp, invstd, weight, has_weight, count, batch_stats,
                          dweight, dbias, mean_dy, k, scale):
    """Per-channel sums from the partials, then dweight, dbias and backward_elementwise's coefficients."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    channels = invstd.size
    if c < channels:
        sum_dy = 0.0
        dotp = 0.0
        for split in range(partial_sum_dy.size // channels):
            sum_dy += partial_sum_dy[split * channels + c]
            dotp += partial_dotp[split * channels + c]
        istd = np.float64(invstd[c])
        w = np.float64(weight[c]) if has_weight else 1.0
        dweight[c] = dotp * istd
        dbias[c] = sum_dy
        if batch_stats:
            mean_dy[c] = sum_dy / count
            k[c] = dotp * istd * istd / count
        else:  # eval: the statistics are constants, dx = dy * invstd * weight
            mean_dy[c] = 0.0
            k[c] = 0.0
        scale[c] = istd * w


@kernel
def update_running(running_mean, running_var, mean, var, momentum, correction):
    """PyTorch's update, in place: running = (1 - m) running + m batch, unbiased variance."""
    c = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    if c < running_mean.size:
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) + momentum * var[c] * correction


# ------------------------------------------------------------- launching ---
def _name(dispatcher):
    return getattr(dispatcher, "py_func", dispatcher).__name__


def _launch(dispatcher, grid, block, *args):
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append((_name(dispatcher), grid, block, args))
    dispatcher[grid, block](*args)


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

    Attributes
    ----------
    splits : int
        Blocks per channel (SLAB) or per tile of channels (ROWS).
    grid, block : tuple of int
        Launch shape: ``grid = (C, splits)`` with 1-D blocks for SLAB;
        ``grid = (tiles, splits)`` with ``block = (width, height)`` for ROWS,
        ``width`` channels by ``height`` rows.
    chunk : int
        Elements of a channel (SLAB) or rows (ROWS) that one block covers.
    """

    def __init__(self, layout_is_rows, outer, channels, inner):
        threads = _threads()
        items = max(1, int(ITEMS_PER_THREAD))
        if layout_is_rows:
            # A warp covers width channels of 32 / width consecutive rows: a
            # contiguous run of memory, even when C is small.
            width = min(WARP_SIZE, 1 << max(0, (channels - 1).bit_length()))
            height = threads // width
            rows = outer
            self.splits = max(1, min(int(MAX_SPLITS), math.ceil(rows / (height * items))))
            self.chunk = math.ceil(rows / self.splits)
            self.grid = (math.ceil(channels / width), self.splits)
            self.block = (width, height)
        else:
            per_channel = outer * inner
            self.splits = max(1, min(int(MAX_SPLITS), math.ceil(per_channel / (threads * items))))
            self.chunk = math.ceil(per_channel / self.splits)
            self.grid = (channels, self.splits)
            self.block = (threads, 1)


def stats(plan, layout_is_rows, x, channels, inner, partial_count, partial_mean, partial_m2, pivot):
    """Launch the statistics reduction: per-block partials (float64) and per-channel pivots."""
    stats_slab, stats_rows, _, _ = _reduction_kernels(accumulator(x.dtype))
    if layout_is_rows:
        _launch(stats_rows, plan.grid, plan.block, x, channels, plan.chunk, partial_count, partial_mean, partial_m2,
                pivot)
    else:
        _launch(stats_slab, plan.grid, plan.block, x, channels, inner, plan.chunk, partial_count, partial_mean,
                partial_m2, pivot)


def backward_reduce(plan, layout_is_rows, dy, x, mean, channels, inner, partial_sum_dy, partial_dotp):
    """Launch the backward reduction: per-block partial sum_dy and dotp (float64)."""
    _, _, reduce_slab, reduce_rows = _reduction_kernels(accumulator(x.dtype))
    if layout_is_rows:
        _launch(reduce_rows, plan.grid, plan.block, dy, x, mean, channels, plan.chunk, partial_sum_dy, partial_dotp)
    else:
        _launch(reduce_slab, plan.grid, plan.block, dy, x, mean, channels, inner, plan.chunk, partial_sum_dy,
                partial_dotp)


def normalize_flat(x, inner, mean, scale, shift, y):
    """Launch y = (x - mean) * scale + shift over flat (outer, C, inner)-ordered arrays."""
    kernel_, _ = _elementwise_kernels(accumulator(x.dtype))
    _launch(kernel_, *_elementwise_grid(x.size), x, inner, mean, scale, shift, y)


def backward_elementwise_flat(dy, x, inner, mean, mean_dy, k, scale, dx):
    """Launch dx = (dy - mean_dy - (x - mean) * k) * scale over flat arrays."""
    _, kernel_ = _elementwise_kernels(accumulator(x.dtype))
    _launch(kernel_, *_elementwise_grid(x.size), dy, x, inner, mean, mean_dy, k, scale, dx)


def gather_flat(source, start, shape, strides, destination):
    """Launch the strided-to-contiguous copy (shape and strides already padded to GATHER_RANK)."""
    _launch(gather, *_elementwise_grid(destination.size), source, start, shape, strides, destination)


def launch_per_channel(dispatcher, channels, *args):
    """Launch one of the one-thread-per-channel kernels."""
    _launch(dispatcher, *_channel_grid(channels), *args)


# ----------------------------------------------------------- signatures ---
def signatures(dtype):
    """Every kernel the dispatcher launches for input of ``dtype``, with its argument types.

    Per-channel arrays and inputs are the contiguous 1-D arrays the backend
    makes; :mod:`fastbn._ptx` compiles exactly these, and a simulator test
    checks that every launch it sees has one of them.

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
    stats_slab, stats_rows, reduce_slab, reduce_rows = _reduction_kernels(acc)
    normalize, elementwise = _elementwise_kernels(acc)
    table = [
        (stats_slab, (data, i64, i64, i64, f64, f64, f64, f64)),
        (stats_rows, (data, i64, i64, f64, f64, f64, f64)),
        (stats_merge, (f64, f64, f64, f64, stat, stat)),
        (forward_coefficients, (f64, f64, f64, f64, real, stat, flag, stat, flag, f64, f64, stat, stat, stat, stat)),
        (normalize_coefficients, (stat, stat, real, stat, flag, stat, flag, stat, stat, stat, stat)),
        (update_running, (stat, stat, f64, f64, real, real)),
        (normalize, (data, i64, stat, stat, stat, data)),
        (reduce_slab, (data, data, stat, i64, i64, i64, f64, f64)),
        (reduce_rows, (data, data, stat, i64, i64, f64, f64)),
        (backward_coefficients, (f64, f64, stat, stat, flag, i64, flag, stat, stat, stat, stat, stat)),
        (elementwise, (data, data, i64, stat, stat, stat, stat, data)),
        (gather, (data, i64, index_tuple, index_tuple, data)),
    ]
    return [(_name(dispatcher), dispatcher, argtypes) for dispatcher, argtypes in table]
