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
    Each thread accumulates, over runs of at most :data:`RUN` of its elements
    of a channel, the plain sum and sum of squares of ``x - pivot`` in the
    accumulation type (float32 for float16 and float32 input, float64 for
    float64), the pivot being the channel's first element (in its group, with
    ghost batches; 0 if that is not finite), and folds each run into its
    (count, mean - pivot, var) summary with Chan's formula; the block's
    threads are merged with Chan's formula through warp shuffles, then through
    shared memory, still in that type, giving one (count, mean - pivot, var)
    per block, written to float64 partials.  A channel with many elements is
    split over several blocks (``splits``, the grid's y extent), so a small C
    still fills the GPU; ``stats_merge`` or ``forward_coefficients``
    (:mod:`fastbn.backends.cuda.numerics`) merge a channel's partials in
    float64.  The error bound of this scheme is derived in :data:`RUN`'s
    comment below.
``backward_reduce_slab`` / ``backward_reduce_rows`` (``_masked``)
    The same structure for ``sum_dy`` and ``dotp = sum((x - mean) * dy)``,
    with forward's saved mean: plain sums in the accumulation type within a
    block, float64 partials.  The ``_masked`` variants use the gradient
    behind a ReLU, dy where the forward output y > 0.
``backward_eval_slab`` / ``backward_eval_rows``
    Eval-mode backward (batch_stats False) in one pass: dx = g * invstd *
    weight (times r with batch renormalization) does not depend on the sums,
    so the reduction that reads dy and x also writes dx (and dres = g), and
    the elementwise pass is not launched.  Masking and dres are run-time flags.

The work of a thread
--------------------
Every thread's elements of a channel form a 2-D progression: ``n_out``
sequences ``base + a * s_out`` (a < n_out), each of ``n_in`` elements ``+ b *
s_in`` (b < n_in).  The inner sequence is walked four elements per iteration,
all four loads issued before any is used, then a remainder loop.  ROWS: one
sequence (the thread's channel), ``s_in`` = ``height * C`` (the rows of the
thread).  SLAB: threads are ``width`` columns (positions along ``inner``) by
``height`` rows of the channel's (rows, inner) matrix, a block covers a
rectangle of it, and the plan chooses which of the thread's rows or columns
is the inner sequence (the longer one, ``rows_inner``).

Indices: the per-element indices are unsigned 64-bit integers (``np.uint64``):
Numba wraps a *signed* index (``if i < 0: i += n``, three instructions a
load) but not an unsigned one, and 64 bits keep arrays of more than 2**31
elements correct.  Everything else (counts, the set-up arithmetic) is int64;
the two are never mixed in one operation (Numba would make int64 + uint64 a
float64).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fastbn.backends.cuda.numerics import MAX_THREADS, device_numerics
from fastbn.backends.cuda.target import cuda, device_function, kernel, named_kernel

__all__ = ["RUN", "UNROLL", "backward_eval_kernels", "backward_reduce_kernels", "gradient", "stats_kernels"]

#: Elements per iteration of the inner loops: four loads in flight per array.
UNROLL = 4

# ----------------------------------------------------------------- RUN ---
#: Elements a thread sums (x - p and (x - p)^2) before folding them into its
#: Chan summary.  A compile-time constant of the statistics kernels.
#:
#: Why 64.  A fold costs about 30 instructions (a division, Chan's merge), so
#: 64 elements per fold add under half an instruction per element; and the
#: error bound below is ``(3 RUN + 7) u`` from the runs plus ``~9 u`` per fold
#: on the longest merge path (J folds for a thread of J runs), minimised near
#: RUN = sqrt(3 E) for E elements per thread: 64 for E ~ 1400, the size of a
#: block's share at a few waves of a large input.
#:
#: Error bound (first order in u; u = 2**-24 for the float32 accumulator of
#: float16 and float32 input, 2**-53 for float64).  Notation: a channel (one
#: group) of N elements x_i, pivot p, d_i = x_i - p, mean m, biased variance v;
#: for any part P of the data (a run, a thread, a block), n_P its size and
#: D_P = sum_P d_i^2, so that D = D_channel = N (v + (m - p)^2).
#:
#: 1. A run of n <= RUN elements (x converted to the accumulator exactly).
#:    d^_i = d_i (1 + e_i), |e_i| <= u.  s^ = sum d^_i, recursive (four-way
#:    pairwise within an iteration, which only shortens the chains):
#:    |s^ - S| <= (n + 1) u sum|d_i| <= (n + 1) u sqrt(n D_r)   (Cauchy-Schwarz)
#:    with S = sum d_i.  q^ = sum d^_i^2 (FMA or mul+add chain):
#:    |q^ - D_r| <= (n + 3) u D_r.  The run's summary is m_r = s^/n (one
#:    rounding) and v_r = (q^ - s^ m_r) / n; the true n v_r = D_r - S^2/n, and
#:    |s^ m_r - S^2 / n| <= 2 |S| |s^ - S| / n + 2 u S^2 / n <= (2 n + 4) u D_r
#:    (|S| <= sqrt(n D_r)); with the subtraction and the division (2 u D_r),
#:        |n v^_r - n v_r| <= (3 n + 9) u D_r,  |m^_r - m_r| <= (n + 2) u sqrt(D_r / n).
#:    This is the only step that cancels: q^ - s^ m_r loses what the shift by p
#:    did not remove, D_r / (n v_r) = 1 + (m_r - p)^2 / v_r.  Without the shift
#:    (p = 0) that factor is 1 + m^2 / v, ruinous for data far from 0; with the
#:    channel's first element it is 1 + (m - p)^2 / v, which stays small unless
#:    the first element is itself an outlier by many standard deviations.
#: 2. Chan's merge of summaries A and B in the accumulator, in variance form
#:    v = w_a v_a + w_b v_b + (w_a delta)(w_b delta), w = n_part / n, delta =
#:    m_b - m_a.  Write the errors as |v^_P - v_P| <= E_v D_P / n_P and
#:    |m^_P - m_P| <= E_m sqrt(D_P / n_P) (m_P in shifted coordinates, so |m_P|
#:    <= sqrt(D_P / n_P)).  The weighted terms carry E_v through unchanged
#:    (w_a D_a / n_a + w_b D_b / n_b = D / n); the delta term adds at most
#:    2 w_a w_b |delta| |delta^ - delta| <= 4 (E_m + u) D / n (with |delta| <=
#:    sqrt(D_a/n_a) + sqrt(D_b/n_b) and (a + b)^2 <= 2 a^2 + 2 b^2); the merge's
#:    own roundings (two divisions, four products, two additions, all terms
#:    >= 0) add 8 u D / n; the mean m_a + w_b delta adds 3 u sqrt(D / n) plus
#:    the carried error (w_a sqrt(D_a/n_a) + w_b sqrt(D_b/n_b) <= sqrt(D/n) by
#:    concavity).  Per merge level: E_v += 4 E_m + 12 u, E_m += 3 u.
#: 3. A block: a thread folds J runs one after another (J levels; the first,
#:    into an empty summary, is exact), then the block merges 5 shuffle levels,
#:    one shared-memory level and 5 more shuffle levels: L = J + 11 levels in
#:    the accumulator.  Then float64: the block's summary is converted exactly,
#:    and stats_merge / forward_coefficients merge the S splits one after
#:    another (S levels at u64 = 2**-53, their E_m already that of step 3).
#: 4. The result is mean = p + m^ and v^ rounded once to the statistics dtype
#:    (unit roundoff u_out).  Summing the recursions, with E_m0 = (RUN + 2) u:
#:        E_m <= (RUN + 2 + 3 L) u + 3 S u64
#:        E_v <= (3 RUN + 9) u + L (4 (RUN + 2 + 3 L) + 12) u + S (4 E_m + 12 u64)
#:    and
#:        |v^ - v| <= E_v (v + (m - p)^2) + u_out v
#:        |mean^ - mean| <= E_m sqrt(v + (m - p)^2) + u_out |mean|.
#:    The bound holds for any finite data whose squares do not overflow; it grows
#:    with (m - p)^2 / v (at most N - 1, when the pivot is the only outlier).
#:    The L^2 term is the worst case of errors in the means all cancelling
#:    the same way; measured errors are orders of magnitude below it
#:    (tests/cuda/test_cuda_bounds.py checks the bound, at its edge too).
#: 5. A run whose sum of squares is not finite (an Inf or NaN in it, or finite
#:    values whose squares overflow, such as float32 values 1e19 apart) is read
#:    again with Welford's update, which keeps a variance, not a sum of squares:
#:    Inf and NaN then propagate as before (an Inf makes the mean Inf, as torch's
#:    sum / n), and finite data with a finite variance keeps it.
RUN = 64


@device_function
def finite_or_zero(value, zero):
    # ``value`` if it is finite, else ``zero``.
    if math.isinf(value) or math.isnan(value):
        return zero
    return value


@device_function
def _count(first, end, step):
    # How many of first, first + step, ... are below end (step > 0).
    if first >= end:
        return 0
    return (end - first + step - 1) // step


@device_function
def _slab_work(
    channels, inner, group_size, start, width, row_chunk, col_chunk, col_splits, rows_inner, c, tid, nthreads, split
):
    # The thread's 2-D progression of channel c in the group at flat index
    # `start` (see the module docstring): (base, n_out, s_out, n_in, s_in),
    # indices and strides unsigned.  Threads are width columns by
    # nthreads // width rows; split (blockIdx.y) is the block's rectangle.
    # (The kernels read the special registers: an inlined device function's
    # temporaries would not be named as the kernel's are.)
    height = nthreads // width
    tx = tid % width
    ty = tid // width
    row_split = split // col_splits
    col_split = split - row_split * col_splits
    rows = group_size // (channels * inner)
    first_row = row_split * row_chunk + ty
    first_col = col_split * col_chunk + tx
    n_rows = _count(first_row, min(rows, (row_split + 1) * row_chunk), height)
    n_cols = _count(first_col, min(inner, (col_split + 1) * col_chunk), width)
    base = np.uint64(0)
    if n_rows > 0 and n_cols > 0:
        base = np.uint64(start + (first_row * channels + c) * inner + first_col)
    row_step = np.uint64(height * channels * inner)
    col_step = np.uint64(width)
    if rows_inner:
        return base, n_cols, col_step, n_rows, row_step
    return base, n_rows, row_step, n_cols, col_step


@functools.cache
def _run_sums(acc):
    """Device function: the sums of ``x - pivot`` and of its squares over ``n`` elements ``index + b * step``."""

    @device_function
    def run_sums(x, index, n, step, pivot):
        step2 = step + step
        step3 = step2 + step
        step4 = step2 + step2
        total = acc(0)
        squares = acc(0)
        k = n
        while k >= 4:
            # All four loads first: four requests in flight per thread.
            v0 = acc(x[index])
            v1 = acc(x[index + step])
            v2 = acc(x[index + step2])
            v3 = acc(x[index + step3])
            d0 = v0 - pivot
            d1 = v1 - pivot
            d2 = v2 - pivot
            d3 = v3 - pivot
            # One add and one FMA an element: chains of four, no pairwise
            # products (which cost a multiply and an add more per pair).
            total += (d0 + d1) + (d2 + d3)
            squares += d0 * d0
            squares += d1 * d1
            squares += d2 * d2
            squares += d3 * d3
            index += step4
            k -= 4
        while k > 0:
            d = acc(x[index]) - pivot
            total += d
            squares += d * d
            index += step
            k -= 1
        return total, squares, index

    return run_sums


@functools.cache
def _thread_summary(acc):
    """Device function: a thread's (count, mean - pivot, var) over its 2-D progression, in runs of RUN."""
    numerics = device_numerics(acc)
    welford_add, chan_merge = numerics.welford_add, numerics.chan_merge
    run_sums = _run_sums(acc)

    @device_function
    def thread_summary(x, base, n_out, s_out, n_in, s_in, pivot):
        count = np.int64(0)
        mean = acc(0)
        var = acc(0)
        sequence = base
        for _ in range(n_out):
            index = sequence
            remaining = n_in
            while remaining > 0:
                take = min(remaining, RUN)
                total, squares, next_index = run_sums(x, index, take, s_in, pivot)
                if math.isinf(squares) or math.isnan(squares):
                    # Inf or NaN in the run, or squares that overflow: Welford's
                    # update on the same elements (RUN's comment, point 5).
                    run_count = np.int64(0)
                    run_mean = acc(0)
                    run_var = acc(0)
                    for _ in range(take):
                        run_count, run_mean, run_var = welford_add(run_count, run_mean, run_var, acc(x[index]) - pivot)
                        index += s_in
                else:
                    n = acc(take)
                    run_mean = total / n
                    run_var = (squares - total * run_mean) / n
                    if run_var < 0:  # rounding; NaN cannot reach here
                        run_var = acc(0)
                count, mean, var = chan_merge(count, mean, var, take, run_mean, run_var)
                index = next_index
                remaining -= take
            sequence += s_out
        return count, mean, var

    return thread_summary


@functools.cache
def stats_kernels(acc):
    """stats_slab and stats_rows, accumulating in ``acc`` (see :func:`~fastbn.backends.cuda.numerics.accumulator`)."""
    block_welford = device_numerics(acc).block_welford
    thread_summary = _thread_summary(acc)

    @kernel
    def stats_slab(
        x,
        channels,
        inner,
        group_size,
        first_group,
        width,
        row_chunk,
        col_chunk,
        col_splits,
        rows_inner,
        partial_count,
        partial_mean,
        partial_m2,
        pivot_out,
    ):
        """Per-block (count, mean - pivot, var) of an (outer, C, inner) x: channel blockIdx.x, rectangle
        blockIdx.y of the channel's (rows, inner) matrix, group first_group + blockIdx.z."""
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
        # the sums then hold values of the size of the spread, not of the mean
        # (the cancellation behind flax#1491); see RUN.  The pivot is 0 where
        # that element is not finite (x - inf would make every deviation NaN).
        pivot = finite_or_zero(acc(x[start + c * inner]), acc(0))
        base, n_out, s_out, n_in, s_in = _slab_work(
            channels,
            inner,
            group_size,
            start,
            width,
            row_chunk,
            col_chunk,
            col_splits,
            rows_inner,
            c,
            tid,
            nthreads,
            split,
        )
        count, mean, m2 = thread_summary(x, base, n_out, s_out, n_in, s_in, pivot)
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
            n_rows = _count(row, min(group_size // channels, (split + 1) * rows_per_split), height)
            base = np.uint64(0)
            if n_rows > 0:
                base = np.uint64(start + row * channels + c)
            count, mean, m2 = thread_summary(x, base, 1, np.uint64(0), n_rows, np.uint64(height * channels), pivot)
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
def _thread_sums(acc, masked, fused):
    """Device function: a thread's sum(g) and sum((x - mean) g) over its 2-D progression.

    The gradient g is masked by y > 0 if ``masked`` (compile time) or
    ``masked_now`` (run time, the eval kernels').  With ``fused`` it also
    writes dx = g * scale (and, with ``write_dres``, dres = g) at each
    element; otherwise ``dx``, ``dres`` and ``scale`` are not touched.
    """

    @device_function
    def element(dy, x, y, index, mean, masked_now):
        # One element's loads: its gradient (gradient()'s select) and its centred x.
        grad = acc(dy[index])
        # masked_now is read only by the eval kernels (``fused``, a compile-time
        # constant), so the reductions' loops hold no run-time test of it.
        if (masked or (fused and masked_now)) and not acc(y[index]) > 0:
            grad = acc(0)
        return grad, acc(x[index]) - mean

    @device_function
    def write(dx, dres, index, grad, scale, write_dres):
        # Eval's writes for one element (nothing without ``fused``).
        if fused:
            dx[index] = grad * scale
            if write_dres:
                dres[index] = grad

    @device_function
    def thread_sums(dy, x, y, dx, dres, base, n_out, s_out, n_in, s_in, mean, scale, masked_now, write_dres):
        sum_dy = acc(0)
        dotp = acc(0)
        step2 = s_in + s_in
        step3 = step2 + s_in
        step4 = step2 + step2
        sequence = base
        for _ in range(n_out):
            index = sequence
            k = n_in
            while k >= 4:
                # All loads of the four elements before any use or store.
                g0, c0 = element(dy, x, y, index, mean, masked_now)
                g1, c1 = element(dy, x, y, index + s_in, mean, masked_now)
                g2, c2 = element(dy, x, y, index + step2, mean, masked_now)
                g3, c3 = element(dy, x, y, index + step3, mean, masked_now)
                sum_dy += (g0 + g1) + (g2 + g3)
                dotp += c0 * g0  # an FMA chain: one instruction an element
                dotp += c1 * g1
                dotp += c2 * g2
                dotp += c3 * g3
                write(dx, dres, index, g0, scale, write_dres)
                write(dx, dres, index + s_in, g1, scale, write_dres)
                write(dx, dres, index + step2, g2, scale, write_dres)
                write(dx, dres, index + step3, g3, scale, write_dres)
                index += step4
                k -= 4
            while k > 0:
                grad, centred = element(dy, x, y, index, mean, masked_now)
                sum_dy += grad
                dotp += centred * grad
                write(dx, dres, index, grad, scale, write_dres)
                index += s_in
                k -= 1
            sequence += s_out
        return sum_dy, dotp

    return thread_sums


def _backward_kernels(acc, masked, fused):
    # The slab and rows kernels of one option set; see backward_reduce_kernels
    # and backward_eval_kernels.
    block_sum2 = device_numerics(acc).block_sum2
    thread_sums = _thread_sums(acc, masked, fused)
    prefix = "backward_eval_" if fused else "backward_reduce_"
    suffix = "_masked" if masked else ""

    @device_function
    def eval_scale(invstd, weight, has_weight, renorm, r, slot, c):
        # backward_coefficients' scale, invstd * weight (* r), in float64, rounded
        # once to the accumulator: dx is then what the elementwise kernel gives.
        w = np.float64(weight[c]) if has_weight else 1.0
        if renorm:
            w *= np.float64(r[c])
        return acc(np.float64(invstd[slot]) * w)

    @named_kernel(prefix + "slab" + suffix)
    def reduce_slab(
        dy,
        x,
        y,
        mean,
        invstd,
        weight,
        has_weight,
        renorm,
        r,
        dx,
        dres,
        masked_now,
        write_dres,
        channels,
        inner,
        group_size,
        first_group,
        width,
        row_chunk,
        col_chunk,
        col_splits,
        rows_inner,
        partial_sum_dy,
        partial_dotp,
    ):
        """Per-block sum(g) and sum((x - mean) * g) of channel blockIdx.x, rectangle blockIdx.y, group
        first_group + blockIdx.z; g is dy, masked by y > 0 if ``masked``; eval kernels also write dx."""
        shared_sum_dy = cuda.shared.array(MAX_THREADS, acc)
        shared_dotp = cuda.shared.array(MAX_THREADS, acc)
        c = np.int64(cuda.blockIdx.x)
        split = np.int64(cuda.blockIdx.y)
        group = first_group + np.int64(cuda.blockIdx.z)
        tid = np.int64(cuda.threadIdx.x)
        nthreads = np.int64(cuda.blockDim.x)
        slot = group * channels + c
        channel_mean = acc(mean[slot])
        scale = eval_scale(invstd, weight, has_weight, renorm, r, slot, c) if fused else acc(0)
        start = group * group_size
        base, n_out, s_out, n_in, s_in = _slab_work(
            channels,
            inner,
            group_size,
            start,
            width,
            row_chunk,
            col_chunk,
            col_splits,
            rows_inner,
            c,
            tid,
            nthreads,
            split,
        )
        sum_dy, dotp = thread_sums(
            dy, x, y, dx, dres, base, n_out, s_out, n_in, s_in, channel_mean, scale, masked_now, write_dres
        )
        sum_dy, dotp = block_sum2(sum_dy, dotp, 1, tid, nthreads, shared_sum_dy, shared_dotp)
        if tid == 0:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    @named_kernel(prefix + "rows" + suffix)
    def reduce_rows(
        dy,
        x,
        y,
        mean,
        invstd,
        weight,
        has_weight,
        renorm,
        r,
        dx,
        dres,
        masked_now,
        write_dres,
        channels,
        group_size,
        first_group,
        rows_per_split,
        partial_sum_dy,
        partial_dotp,
    ):
        """Per-block sum(g) and sum((x - mean) * g) of (rows, C) views, blockIdx.z the group; eval kernels
        also write dx."""
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
            scale = eval_scale(invstd, weight, has_weight, renorm, r, slot, c) if fused else acc(0)
            row = split * rows_per_split + ty
            n_rows = _count(row, min(group_size // channels, (split + 1) * rows_per_split), height)
            base = np.uint64(0)
            if n_rows > 0:
                base = np.uint64(group * group_size + row * channels + c)
            row_step = np.uint64(height * channels)
            sum_dy, dotp = thread_sums(
                dy, x, y, dx, dres, base, 1, np.uint64(0), n_rows, row_step, channel_mean, scale, masked_now, write_dres
            )
        sum_dy, dotp = block_sum2(sum_dy, dotp, width, tid, width * height, shared_sum_dy, shared_dotp)
        if ty == 0 and c < channels:
            partial_sum_dy[split * mean.size + slot] = sum_dy
            partial_dotp[split * mean.size + slot] = dotp

    return reduce_slab, reduce_rows


@functools.cache
def backward_reduce_kernels(acc, masked):
    """backward_reduce_slab and backward_reduce_rows (``_masked``), on the gradient of :func:`gradient`.

    They take the eval kernels' arguments too (invstd ... write_dres),
    unread, so that one launch function serves both.
    """
    return _backward_kernels(acc, bool(masked), False)


@functools.cache
def backward_eval_kernels(acc):
    """backward_eval_slab and backward_eval_rows: the reductions plus eval's dx, in one pass.

    dx = g * invstd * weight (times r with ``renorm``), g the gradient of
    :func:`gradient`, masked by y > 0 where the run-time flag ``masked_now``
    says; with the run-time flag ``write_dres`` also dres = g.  The options
    are run-time flags, not kernels of their own (as the reductions' are):
    eval backward is the rarer call, and two kernels compile faster than
    eight; the flags are uniform branches.
    """
    return _backward_kernels(acc, False, True)
