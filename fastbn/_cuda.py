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
``backward_reduce_slab`` / ``backward_reduce_rows`` (``_masked``)
    The same structure for ``sum_dy`` and ``dotp = sum((x - mean) * dy)``;
    the ``_masked`` variants use the gradient behind a ReLU, dy where the
    forward output y > 0.
``normalize`` / ``backward_elementwise`` (and their option variants)
    Elementwise, grid-stride loops over the flat array; one kernel serves
    both patterns because the channel index is carried along incrementally
    instead of being divided out of the flat index for every element.
    ``normalize_residual``, ``normalize_relu`` and ``normalize_residual_relu``
    add a residual and/or apply a ReLU in the same pass;
    ``backward_elementwise_masked``, ``_dres`` and ``_masked_dres`` mask the
    gradient by ``y > 0`` and/or also write the residual's gradient.
``forward_coefficients``, ``normalize_coefficients``, ``backward_coefficients``, ``update_running``
    One thread per channel: the small per-channel arithmetic between the big
    kernels, done on the device so that no statistic travels to the host
    (batch renormalization's r and d included).
``gather``
    Copies a strided input that fits neither pattern into a contiguous one.

Ghost batch norm (G groups of consecutive samples, each normalised with its
own statistics) adds no pass and no kernel: a group is a contiguous 1/G of
the flat array in either layout, the reductions take the group from
blockIdx.z, and the elementwise kernels carry it along with the channel.
Kernel options (ReLU, residual, mask, residual gradient) are compile-time
constants of kernels generated per option set, so a disabled option costs
nothing.

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
#: At most this many ghost-batch groups per reduction launch (gridDim.z's limit
#: is 65535); more groups take several launches.
MAX_GROUPS_PER_LAUNCH = 65535

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
# Ghost batch norm splits x into G groups, each one contiguous 1/G of the flat
# array (the samples g N / G ... along axis 0, which comes first in both
# layouts).  The reductions treat every (group, channel) pair as a channel of
# its own, "virtual channel" g * C + c, with the group in blockIdx.z (offset by
# ``first_group``: gridDim.z is at most 65535).  Partials are laid out
# [split, g * C + c].  G = 1 is plain batch norm.


def _named_kernel(name):
    """Decorator: a kernel whose Python name (its name in launches and PTX) is ``name``.

    The kernel generators below compile one variant of a kernel per option
    set; each variant is named for its options so that ``python -m fastbn
    ptx`` and the launch log tell them apart.
    """

    def decorate(func):
        func.__name__ = func.__qualname__ = name
        return kernel(func)

    return decorate


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


@functools.cache
def _stats_kernels(acc):
    welford_add, _, block_welford, _ = _numerics(acc)

    @kernel
    def stats_slab(x, channels, inner, group_size, first_group, chunk, partial_count, partial_mean, partial_m2,
                   pivot_out):
        """Per-block (count, mean - pivot, M2) of an (outer, C, inner) x: channel blockIdx.x, split
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
        pivot = acc(x[start + c * inner])
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
    def stats_rows(x, channels, group_size, first_group, rows_per_split, partial_count, partial_mean, partial_m2,
                   pivot_out):
        """Per-block (count, mean - pivot, M2) of a (rows, C) x; threadIdx.x walks channels, threadIdx.y
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
            pivot = acc(x[start + c])  # see stats_slab
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
def _gradient(acc, masked):
    """Device function: the gradient at the normalisation's output, element ``index``.

    Without ``masked`` it is dy.  With ``masked`` (the backward of a ReLU,
    ``y`` being forward's output) it is dy where y > 0 and 0 elsewhere, y NaN
    included: a select, not dy * (y > 0), so that an Inf or NaN in dy where
    the ReLU was closed is dropped, as PyTorch drops it.  Without ``masked``,
    ``y`` is never read (the caller passes any array of dy's type).
    """

    @device_function
    def gradient(dy, y, index):
        grad = acc(dy[index])
        if masked and not acc(y[index]) > 0:
            grad = acc(0)
        return grad

    return gradient


@functools.cache
def _backward_reduce_kernels(acc, masked):
    """backward_reduce_slab and backward_reduce_rows, on the gradient of :func:`_gradient` (acc, masked)."""
    _, _, _, block_sum2 = _numerics(acc)
    gradient = _gradient(acc, masked)
    suffix = "_masked" if masked else ""

    @_named_kernel("backward_reduce_slab" + suffix)
    def backward_reduce_slab(dy, x, y, mean, channels, inner, group_size, first_group, chunk, partial_sum_dy,
                             partial_dotp):
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
            grad = gradient(dy, y, index)
            sum_dy += grad
            dotp += (acc(x[index]) - channel_mean) * grad
            j += nthreads
            i, index = _slab_next(i, index, i_step, index_step, channels, inner)
        sum_dy, dotp = block_sum2(sum_dy, dotp, 1, tid, nthreads, shared_sum_dy, shared_dotp)
        if tid == 0:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    @_named_kernel("backward_reduce_rows" + suffix)
    def backward_reduce_rows(dy, x, y, mean, channels, group_size, first_group, rows_per_split, partial_sum_dy,
                             partial_dotp):
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
                grad = gradient(dy, y, index)
                sum_dy += grad
                dotp += (acc(x[index]) - channel_mean) * grad
                row += height
                index += height * channels
        sum_dy, dotp = block_sum2(sum_dy, dotp, width, tid, width * height, shared_sum_dy, shared_dotp)
        if ty == 0 and c < channels:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    return backward_reduce_slab, backward_reduce_rows


# --------------------------------------------------- elementwise kernels ---
# Grid-stride loops over the flat array, in either layout: the flat index is
# ((g * rows + row) * C + c) * inner + i with g the group (ghost batch norm),
# and the per-channel coefficients are indexed by the virtual channel g C + c.
# A cursor (i, c, r, g C), r the offset in the group, is carried along the
# loop by mixed-radix addition: a few integer additions per element, no
# division, and the same code for G = 1, where r never wraps.
@device_function
def _cursor(index, step, channels, inner, group_size):
    # The cursor of flat index `index`, and the cursor increments of a step.
    rows_step = step // inner
    position = (index % inner, (index // inner) % channels, index % group_size, (index // group_size) * channels)
    steps = (step - rows_step * inner, rows_step % channels, step % group_size, (step // group_size) * channels)
    return position, steps


@device_function
def _advance(position, steps, channels, inner, group_size):
    # position + steps, with the carries: i into c, r into the group.
    i = position[0] + steps[0]
    c = position[1] + steps[1]
    r = position[2] + steps[2]
    base = position[3] + steps[3]
    if i >= inner:
        i -= inner
        c += 1
    if c >= channels:
        c -= channels
    if r >= group_size:
        r -= group_size
        base += channels
    return (i, c, r, base)


@functools.cache
def _elementwise_kernels(acc, gate, extra):
    """The forward and backward elementwise kernels for one option set.

    Both options are compile-time constants of the generated kernels; a
    disabled option's code and memory traffic are gone, and the array it
    would use is never read or written (callers pass any array of the right
    type in its place).

    Parameters
    ----------
    acc : type
        The compute type (see :func:`accumulator`); every element is computed
        in it and rounded once to the output dtype.
    gate : bool
        Forward: ReLU at the output, ``v if not v < 0 else 0`` (NaN passes, as
        in PyTorch).  Backward: the gradient is masked by ``y > 0``
        (:func:`_gradient`).
    extra : bool
        Forward: add the residual ``z`` before the activation.  Backward: also
        write the (masked) gradient, which is the residual's gradient, to
        ``dres``.

    Returns
    -------
    normalize, backward_elementwise : kernel
        Named ``normalize[_residual][_relu]`` and
        ``backward_elementwise[_masked][_dres]``.
    """
    gradient = _gradient(acc, gate)

    @_named_kernel("normalize" + ("_residual" if extra else "") + ("_relu" if gate else ""))
    def normalize(x, z, channels, inner, group_size, mean, scale, shift, y):
        """y = act((x - mean) * scale + shift [+ z]) per virtual channel; flat arrays in layout order."""
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        position, steps = _cursor(index, step, channels, inner, group_size)
        while index < x.size:
            v = position[1] + position[3]
            value = (acc(x[index]) - mean[v]) * scale[v] + shift[v]
            if extra:
                value += acc(z[index])
            if gate and value < 0:
                value = acc(0)
            y[index] = value
            index += step
            position = _advance(position, steps, channels, inner, group_size)

    @_named_kernel("backward_elementwise" + ("_masked" if gate else "") + ("_dres" if extra else ""))
    def backward_elementwise(dy, x, y, channels, inner, group_size, mean, mean_dy, k, scale, dx, dres):
        """dx = (g - mean_dy - (x - mean) * k) * scale per virtual channel, g the gradient of
        :func:`_gradient`; dres = g if ``extra``."""
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        position, steps = _cursor(index, step, channels, inner, group_size)
        while index < x.size:
            v = position[1] + position[3]
            grad = gradient(dy, y, index)
            dx[index] = (grad - mean_dy[v] - (acc(x[index]) - mean[v]) * k[v]) * scale[v]
            if extra:
                dres[index] = grad
            index += step
            position = _advance(position, steps, channels, inner, group_size)

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
# nothing and the merge adds no rounding to the blocks' results.  With ghost
# batch norm, a channel's thread loops over the G groups (virtual channels
# g * C + c): G * C * splits operations, still nothing next to the big kernels.
_, _chan_merge64, _, _ = _numerics(np.float64)


@device_function
def _merged_stats(v, partial_count, partial_mean, partial_m2, pivot):
    # Mean and biased variance of virtual channel v from its blocks' partials.
    slots = pivot.size
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for split in range(partial_count.size // slots):
        slot = split * slots + v
        count, mean, m2 = _chan_merge64(count, mean, m2, partial_count[slot], partial_mean[slot], partial_m2[slot])
    return np.float64(pivot[v]) + mean, m2 / count


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
def forward_coefficients(partial_count, partial_mean, partial_m2, pivot, eps, weight, has_weight, bias, has_bias,
                         renorm, running_mean, running_var, rmax, dmax, r_out, d_out,
                         mean64, var64, saved_mean, saved_invstd, scale, shift):
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
            saved_invstd[v] = 1.0 / math.sqrt(var + eps)
            # Normalise with the saved (rounded) mean and invstd, read back
            # from memory, so that backward sees exactly what forward used.
            scale[v] = np.float64(saved_invstd[v]) * w
            shift[v] = b
        mean64[c] = mean_sum / groups
        var64[c] = var_sum / groups
        if renorm:
            sigma_running = math.sqrt(np.float64(running_var[c]) + eps)
            r_out[c] = _clip(math.sqrt(var + eps) / sigma_running, 1.0 / rmax, rmax)
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
        saved_invstd[c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
        w = np.float64(weight[c]) if has_weight else 1.0
        scale[c] = np.float64(saved_invstd[c]) * w
        shift[c] = bias[c] if has_bias else 0.0


@kernel
def backward_coefficients(partial_sum_dy, partial_dotp, invstd, weight, has_weight, count, batch_stats,
                          renorm, r, d, dweight, dbias, mean_dy, k, scale):
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

    def launches(self):
        """The launches that cover every group: ``(grid, first_group)`` pairs."""
        columns, splits, _ = self.grid
        for first in range(0, self.groups, self._per_launch):
            yield (columns, splits, min(self._per_launch, self.groups - first)), first


def stats(plan, layout_is_rows, x, channels, inner, partial_count, partial_mean, partial_m2, pivot):
    """Launch the statistics reduction: per-block partials (float64) and pivots, per group and channel."""
    stats_slab, stats_rows = _stats_kernels(accumulator(x.dtype))
    group_size = x.size // plan.groups
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(stats_rows, grid, plan.block, x, channels, group_size, first, plan.chunk, partial_count,
                    partial_mean, partial_m2, pivot)
        else:
            _launch(stats_slab, grid, plan.block, x, channels, inner, group_size, first, plan.chunk, partial_count,
                    partial_mean, partial_m2, pivot)


def backward_reduce(plan, layout_is_rows, dy, x, y, mean, channels, inner, partial_sum_dy, partial_dotp, *,
                    masked=False):
    """Launch the backward reduction: per-block partial sum_dy and dotp (float64), per group and channel.

    With ``masked`` the gradient is dy where y > 0, else 0; otherwise ``y`` is
    not read (pass any array of dy's type).
    """
    reduce_slab, reduce_rows = _backward_reduce_kernels(accumulator(x.dtype), bool(masked))
    group_size = x.size // plan.groups
    for grid, first in plan.launches():
        if layout_is_rows:
            _launch(reduce_rows, grid, plan.block, dy, x, y, mean, channels, group_size, first, plan.chunk,
                    partial_sum_dy, partial_dotp)
        else:
            _launch(reduce_slab, grid, plan.block, dy, x, y, mean, channels, inner, group_size, first, plan.chunk,
                    partial_sum_dy, partial_dotp)


def normalize_flat(x, z, channels, inner, groups, mean, scale, shift, y, *, relu=False, residual=False):
    """Launch y = act((x - mean) * scale + shift [+ z]) over flat layout-ordered arrays.

    The coefficients hold ``groups * channels`` entries (virtual channels).
    ``z`` is read only with ``residual`` (otherwise pass any array of x's type).
    """
    kernel_, _ = _elementwise_kernels(accumulator(x.dtype), bool(relu), bool(residual))
    _launch(kernel_, *_elementwise_grid(x.size), x, z, channels, inner, x.size // groups, mean, scale, shift, y)


def backward_elementwise_flat(dy, x, y, channels, inner, groups, mean, mean_dy, k, scale, dx, dres, *, masked=False,
                              write_dres=False):
    """Launch dx = (g - mean_dy - (x - mean) * k) * scale over flat arrays; dres = g if ``write_dres``.

    g is dy, or with ``masked`` dy where y > 0 and 0 elsewhere.  ``y`` and
    ``dres`` are touched only with their options (otherwise pass any array of
    the type).
    """
    _, kernel_ = _elementwise_kernels(accumulator(x.dtype), bool(masked), bool(write_dres))
    _launch(kernel_, *_elementwise_grid(x.size), dy, x, y, channels, inner, x.size // groups, mean, mean_dy, k, scale,
            dx, dres)


def gather_flat(source, start, shape, strides, destination):
    """Launch the strided-to-contiguous copy (shape and strides already padded to GATHER_RANK)."""
    _launch(gather, *_elementwise_grid(destination.size), source, start, shape, strides, destination)


def launch_per_channel(dispatcher, channels, *args):
    """Launch one of the one-thread-per-channel kernels."""
    _launch(dispatcher, *_channel_grid(channels), *args)


# ----------------------------------------------------------- signatures ---
OPTIONS = ((False, False), (True, False), (False, True), (True, True))


def signatures(dtype):
    """Every kernel the dispatcher launches for input of ``dtype``, with its argument types.

    Per-channel arrays and inputs are the contiguous 1-D arrays the backend
    makes; :mod:`fastbn._ptx` compiles exactly these, and simulator tests
    check that every launch they see has one of them.  Every option variant
    of the generated kernels is listed (four elementwise kernels each way,
    two backward reductions each way).

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
    stats_slab, stats_rows = _stats_kernels(acc)
    table = [
        (stats_slab, (data, i64, i64, i64, i64, i64, f64, f64, f64, f64)),
        (stats_rows, (data, i64, i64, i64, i64, f64, f64, f64, f64)),
        (stats_merge, (f64, f64, f64, f64, stat, stat)),
        (forward_coefficients, (f64, f64, f64, f64, real, stat, flag, stat, flag, flag, stat, stat, real, real,
                                stat, stat, f64, f64, stat, stat, stat, stat)),
        (normalize_coefficients, (stat, stat, real, stat, flag, stat, flag, stat, stat, stat, stat)),
        (update_running, (stat, stat, f64, f64, real, real)),
        (backward_coefficients, (f64, f64, stat, stat, flag, i64, flag, flag, stat, stat, stat, stat, stat, stat,
                                 stat)),
        (gather, (data, i64, index_tuple, index_tuple, data)),
    ]
    for masked in (False, True):
        reduce_slab, reduce_rows = _backward_reduce_kernels(acc, masked)
        table.append((reduce_slab, (data, data, data, stat, i64, i64, i64, i64, i64, f64, f64)))
        table.append((reduce_rows, (data, data, data, stat, i64, i64, i64, i64, f64, f64)))
    for gate, extra in OPTIONS:
        normalize, elementwise = _elementwise_kernels(acc, gate, extra)
        table.append((normalize, (data, data, i64, i64, i64, stat, stat, stat, data)))
        table.append((elementwise, (data, data, data, i64, i64, i64, stat, stat, stat, stat, data, data)))
    return [(_name(dispatcher), dispatcher, argtypes) for dispatcher, argtypes in table]
