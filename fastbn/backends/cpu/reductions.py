"""CPU reduction kernels: per-channel statistics and gradient sums.

Every input reaches these kernels as a C-contiguous view of one of two
shapes (:mod:`fastbn._layout`): ``SLAB`` ``(N, C, L)``, each channel ``N``
runs of ``L`` contiguous elements (NCHW, NCL, NCDHW), or ``ROWS`` ``(M, C)``,
channels contiguous (NHWC, ``(N, C)``).

float64 input accumulates in float64; float32 input in float32 vector
lanes of fixed order, added in float64 (its ROWS gradient sums in float64);
float16 and bfloat16 input in float32 blocks, added in float64 (see "error
bound").  The sums run over pieces (SLAB) or
blocks of rows (ROWS) that stay in cache between their two passes, merged
with Chan's formula (:mod:`fastbn.backends.cpu.numerics`); the statistics
are computed on x minus a per-channel pivot, and channels that overflow are
computed again, scaled ("error bound" below).  Partitions and reduction
orders depend only on the shape and dtype, never on the thread count, so
results are bit-for-bit reproducible across runs and thread counts.

One exception, observed: the half types' float32 block sums are loops that
LLVM vectorises with reassociation, and how it vectorises one can depend on
where it inlines it, which differs between kernels and, it seems, between
compilations of a kernel.  Before the kernels borrowed their arguments, 24
of 296 random short-run float16 SLAB shapes got running means a float32 ulp
apart between the small calls' kernels and the plans; after it, none of
them did, yet a comparison of the two plans on six such shapes failed once,
in a process that compiled some of its kernels, and passed when rerun, as
one CI run's bfloat16 small-call test did (not reproduced since).  For float16
and bfloat16 input the plans, and the small calls' serial kernels, agree
within the error bound below, not always bit for bit.  float32's sums
have a fixed order (lanes) and cannot differ so; float64's reassociated
float64 loops could in principle, and tests/test_fused.py checks its plans
bit for bit.  Summing the half types in fixed-order lanes as float32 does
would close it.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from fastbn.backends.cpu.jit import borrowed, inline, kept, kernel
from fastbn.backends.cpu.lanes import run_gradient_sums, run_lane_sum, run_lane_sums_sq
from fastbn.backends.cpu.loops import (
    centred_block_moments,
    cols_centred_sums,
    cols_centred_sums2,
    cols_grad_sums,
    cols_grad_sums2,
    cols_sum,
    cols_sum2,
    load,
    narrow,
    part,
    run_shifted_sum,
    shifted_moments,
    single,
    stats_row_block,
    stats_scratch,
)
from fastbn.backends.cpu.numerics import add_piece, merge_piece
from fastbn.backends.cpu.plan import LANE_BLOCK, MAX_CHUNKS
from fastbn.backends.cpu.plan import slab_pieces as _plain_slab_pieces
from fastbn.backends.cpu.rescue import rescue_grad_rows, rescue_grad_slab, rescue_rows, rescue_slab

# ------------------------------------------------------------ SLAB pieces ---
# Every SLAB reduction is defined on the same fixed pieces, so that the fused
# and streamed strategies compute bit-for-bit the same statistics and
# gradient sums (the plan may then pick either per call).  A piece is one
# channel's elements in outer rows n0..n1-1 and columns i0..i1-1: whole runs
# grouped until a piece has MIN_PIECE elements, or a long run split into
# parts of at most MAX_PIECE (fastbn.backends.cpu.plan).  Each piece gets an exact two-pass mean and M2
# in float64 while it sits in L1/L2; a channel's pieces are merged in piece
# order with Chan's formula.  Gradient sums are float64 partials per piece,
# added in piece order.


# The piece arithmetic is the plan's (plain Python there, for choosing a strategy), compiled here.
slab_pieces = inline(_plain_slab_pieces)


@inline
def piece_capacity(L):
    """Elements of the largest piece (whole short runs, or a part of a long one)."""
    runs, per_row, _ = slab_pieces(1, L)
    return runs * ((L + per_row - 1) // per_row)


@inline
def slab_piece(p, N, L, runs, per_row):
    """Bounds (n0, n1, i0, i1) of piece p."""
    n0 = (p // per_row) * runs
    part = p % per_row
    return n0, min(N, n0 + runs), part * L // per_row, (part + 1) * L // per_row


# ------------------------------------------------------ error bound ---
# Every statistic is computed on d = x - K, K the channel's pivot (its first
# element, or 0 if that is not finite; channel_pivot), in float64 (unit
# roundoff u = 2^-53).  Per piece or block of s elements, two passes: m =
# sum(d) / s, then M2 = sum((d - m)^2).  Since sum(d - m_exact) = 0, the
# second pass computes the exact M2 plus s * (m - m_exact)^2, and
# |m - m_exact| <= s u R with R = max |x - K|, at most the channel's range
# (max - min); the sums' own rounding adds at most s u M2.  Chan's merge of
# P pieces adds at most 3 u per merge.  Hence, for n elements in P pieces,
#
#     |var_computed - var| <= (s + 3 P + 2) u var + s^2 u^2 R^2
#
# (s: a piece's elements per channel, at most MAX_PIECE = 4096, or a ROWS
# block's rows, at most BLOCK_ELEMENTS = 16384)
# and |mean_computed - mean| <= (s + 3 P + 2) u R + u |mean|.  The pivot is
# what makes the absolute terms scale with the channel's range R instead of
# its magnitude: a constant channel gets variance 0 exactly, whatever its
# value (without it, a float64 channel of 1e200s got (u 1e200)^2 = inf).
# x - K is exact for float16, bfloat16 and float32 input (24-bit
# significands, less than 29 binades apart) and rounded once (u) for float64.
# (tests/test_numerics.py checks the bound; tests/test_adversarial.py the
# extreme values.)
#
# float16 and bfloat16 input accumulate in float32 instead (u = 2^-24; twice
# the vector lanes of float64, and a float32 scratch): d = fl32(x - K), sums
# in float32 over blocks of at most B = LANE_BLOCK elements per channel (a
# run's consecutive elements, SLAB; rows, ROWS), the blocks' sums added in
# float64, pieces and blocks merged with Chan's formula in float64.  Per
# piece of s elements: pass 1 gives the float32 mean m32 of d, within
# (B + 1) u R of the mean m of d; pass 2 sums Q = sum((d - m32)^2) and c =
# sum(d - m32) in float32 blocks and returns mean m32 + c / s and M2 = Q -
# c^2 / s (the corrected two-pass algorithm: exact for any m32, so m32's own
# error leaves only terms of order u^2 R^2).  ROWS blocks sum x - c instead,
# c = fl32(K + m32): one subtraction, rounded once as d - m32 is, which no
# fast-math reassociation can turn into (x - m32) - K, rounded at x's own
# magnitude (measured: 5e-5 of the variance at a mean of 3000 spreads); c's
# rounding is one more constant shift, which the correction undoes.  A block of B terms summed in
# any order (fast-math may reorder) is off by at most (B - 1) u times the sum
# of their magnitudes, each squared deviation carries at most 3 u, so to
# first order M2 is within (B + 2) u M2 and the piece mean within B u sd_p
# (sd_p the piece's standard deviation).  Chan's merge then adds, through
# the pieces' mean errors, at most 2 B u var (Cauchy-Schwarz over the
# between-piece term, with sum_p n_p var_p <= n var), and rounding d once
# moves the variance by at most 2 u sqrt(var (var + (mean - K)^2)).  Hence
#
#     |var_computed - var| <= (3 B + 2) u var + 2 u sqrt(var (var + (mean - K)^2))
#                             + (3 P + 2) u64 var + 8 (B + 1)^2 u^2 (var + R^2)
#     |mean_computed - mean| <= B u sqrt(var) + u sqrt(var + (mean - K)^2) + 8 (B + 1)^2 u^2 R
#
# (u64 = 2^-53; the last terms bound the second-order remainder).  With B =
# 256 the first term is 4.6e-5 of the variance at worst, far above what
# random rounding gives (about sqrt(B) u, 1e-6); it costs a float16 or
# bfloat16 output at most 2.3e-5 of its value, a twentieth of a float16 ulp
# (2^-11).
#
# float32 input (SLAB) sums in float32 vector lanes whose order the code
# fixes (fastbn.backends.cpu.lanes: each term passes through at most 7
# float32 additions, 3 in whole blocks, then float64 ones), so its bound does
# not grow with a block's length.  Per piece of s elements: pass 1 sums t =
# fl32(x - K) (K the pivot, a float32 value), within 8 u R of the exact sum
# per element (7 u for the lanes, u for rounding t), so its mean m is within
# 8 u R of the mean of x - K; c = fl32(K + m) is then within delta <= u |mean|
# + 8 u R of the piece's mean.  Pass 2 sums d = fl32(x - c) (exact where x
# is within a factor of 2 of c, by Sterbenz's lemma; else within u |x - c|)
# and fl32(d^2): with e = x - c, sum(e) = s delta and M2 = sum(e^2) - s
# delta^2, the sums are
#
#     |Q - sum(e^2)| <= 10 u sum(e^2) = 10 u (M2 + s delta^2)
#     |D - s delta|  <= 8 u sum|e| <= 8 u s (sd_p + |delta|)    (Cauchy-Schwarz)
#
# and M2 = Q - D^2 / s (the corrected two-pass algorithm) is within
# s (10 u var_p + 16 u |delta| sd_p + 26 u delta^2), mean c + D / s within
# 8 u (sd_p + |delta|).  Chan's merge (float64) adds, through the pieces'
# mean errors, at most 16 u var (Cauchy-Schwarz, as for the half types).
# Hence, with R at most the channel's range,
#
#     |var_computed - var| <= (26 u + 16 u^2 (|mean| + 8 R) / sd + (3 P + 2) u64) var + 2^-149
#     |mean_computed - mean| <= 8 u sd + 2 u64 |mean|
#
# (u = 2^-24; the last term: float32 squares below 2^-126 are rounded to
# the subnormal grid).  26 u is 1.5e-6: a float32 channel whose mean is 1e4
# times its standard deviation (the 16 u^2 term is then 6e-10) keeps its
# variance within 1e-5 with a margin of 6, and no sum's error depends on the
# order LLVM chooses.  The mean's error is a few ulps of the standard
# deviation, as torch's float32 sums are; rounding the mean to float32 adds
# half an ulp of it.
#
# float32 input in the ROWS layout (NHWC, (N, C)) takes the same two passes
# per block of rows (c per channel), its float32 sums over sub-blocks of
# SUB_ROWS = 16 rows added in float64 (rows_block_lanes): a channel's rows
# are added in order, in pairs, so a term passes through at most 8 float32
# additions (9 u in pass 1 with the rounding of x - K; 11 u for d^2, 9 u for
# d in pass 2), and the same argument gives
#
#     |var_computed - var| <= (29 u + 18 u^2 (|mean| + 9 R) / sd + (3 P + 2) u64) var + 2^-149
#     |mean_computed - mean| <= 9 u sd + 2 u64 |mean|
#
# The gradient sums sum(g) and sum((x - mean) g) of the half types take the
# same float32 blocks (loops.run_grad_sums_narrow, cols_grad_sums): each
# block of B products, each rounded once in x - m32 and once in the product,
# is within (B + 1) u of the sum of its terms' magnitudes, so to first order
# |sum_g - exact| <= B u sum|g| and |dotp - exact| <= (B + 1) u sum|x - m32||g|
# (m32 the mean rounded to float32; the term (m32 - mean) sum_g, added in
# float64, makes the result the sum around the mean itself).  float32 SLAB
# input sums them in the float32 lanes (lanes.run_grad_sums_lanes), around
# m32 too: each term of sum(g) passes through at most 7 float32 additions,
# each of sum((x - m32) g) through the rounding of x - m32 and of the
# product as well, so |sum_g - exact| <= 7 u sum|g| and |dotp - exact| <=
# 9 u sum|x - m32||g|, plus u64 terms.  float64 input, and float32 in the
# ROWS layout, accumulate them in float64 (u64 = 2^-53 in place of u).
#
# Overflow: sum(d) or M2 may overflow float64 where the mean and variance
# are finite (deviations beyond 1e154 squared; values near 1.8e308 summed),
# and an Inf among finite values makes Chan's merge compute inf - inf.  Any
# channel whose mean or variance comes out non-finite is therefore computed
# again by rescue_slab / rescue_rows (fastbn.backends.cpu.rescue), on d * 2^-e (rescue_scale): no sum of those can
# overflow, and the results scaled back overflow only where the true ones
# do.  That path is taken only for such channels (NaN and Inf input among
# them, where it gives torch's mean: +inf for a channel holding +inf).
# Likewise the gradient sums: a channel whose sum(g) or sum((x - mean) g)
# comes out non-finite is summed again in float64 without blocks
# (rescue_grad_slab / rescue_grad_rows); the half types' float32 blocks
# overflow for bfloat16 values near 3.4e38, the float64 sums cannot.

#: Rows per float32 sub-block of the ROWS statistics: a channel's float32 sum of them passes each term
#: through at most 8 additions (rows are added in pairs), so its bound does not grow with the block.
SUB_ROWS = 16


@inline
def channel_pivot(value):
    """The pivot K of a channel whose first element is ``value``: the value in float64, or 0 if not finite."""
    v = np.float64(load(value))
    return v if np.isfinite(v) else 0.0


def piece_stats(x, c, n0, n1, i0, i1, pivot, scratch):
    """Mean (of x - pivot) and M2 of one piece of channel c: float32 lanes for float32 input, else as below."""


@overload(piece_stats, inline="always")
def _piece_stats_impl(x, c, n0, n1, i0, i1, pivot, scratch):
    if x.dtype == types.float32:
        return lambda x, c, n0, n1, i0, i1, pivot, scratch: piece_stats_lanes(x, c, n0, n1, i0, i1, pivot)
    return lambda x, c, n0, n1, i0, i1, pivot, scratch: piece_stats_wide(x, c, n0, n1, i0, i1, pivot, scratch)


def piece_scratch(x, size):
    """The shifted piece :func:`piece_stats_wide` keeps between its passes; nothing for float32 (lanes)."""


@overload(piece_scratch, inline="always")
def _piece_scratch_impl(x, size):
    if x.dtype == types.float32:
        return lambda x, size: np.empty(0, np.float64)
    return lambda x, size: stats_scratch(x, size)


@inline
def piece_stats_wide(x, c, n0, n1, i0, i1, pivot, scratch):
    # Two passes (mean, then squared deviations) of x - pivot: never
    # E[x^2] - E[x]^2, which cancels when |mean| >> std.  The first pass
    # keeps the piece shifted in ``scratch`` (L1; float64, or float32 for
    # the half types), so the second converts nothing and DRAM sees x once.
    # float64 input accumulates in float64; float16 and bfloat16 in float32
    # blocks (see "error bound").
    width = i1 - i0
    total = 0.0
    for n in range(n1 - n0):
        total += run_shifted_sum(x[n0 + n, c, i0:i1], scratch[n * width : (n + 1) * width], pivot)
    return shifted_moments(scratch[: (n1 - n0) * width], total)


@inline
def piece_stats_lanes(x, c, n0, n1, i0, i1, pivot):
    # float32 input (see "error bound", float32): pass 1 sums x - K in float32 lanes (K the pivot, a
    # float32 value); pass 2 sums d = x - c and d^2 around c = fl32(K + m), m pass 1's mean, and
    # returns the corrected two-pass mean c + sum(d) / s and M2 = sum(d^2) - sum(d)^2 / s.  The piece
    # (at most MAX_PIECE elements) is still in L1 or L2 for pass 2: DRAM sees x once.
    k = np.float32(pivot)
    total = 0.0
    for n in range(n1 - n0):
        total += run_lane_sum(x[n0 + n, c, i0:i1], k)
    size = (n1 - n0) * (i1 - i0)
    centre = np.float32(pivot + total / size)
    dev = 0.0
    sq = 0.0
    for n in range(n1 - n0):
        run_dev, run_sq = run_lane_sums_sq(x[n0 + n, c, i0:i1], centre)
        dev += run_dev
        sq += run_sq
    m2 = sq - dev * dev / size
    # >= dev^2 / s exactly; rounding may undercut it by a few ulps (NaN stays NaN)
    return (np.float64(centre) - pivot) + dev / size, 0.0 if m2 < 0.0 else m2


@inline
def piece_grad_sums(dy, m, x, c, n0, n1, i0, i1, mean):
    sum_dy = 0.0
    dotp = 0.0
    for n in range(n1 - n0):
        run_dy, run_dotp = run_gradient_sums(
            dy[n0 + n, c, i0:i1], part(m, (n0 + n, c, slice(i0, i1))), x[n0 + n, c, i0:i1], mean
        )
        sum_dy += run_dy
        dotp += run_dotp
    return sum_dy, dotp


# ------------------------------------------------------ SLAB, fused plan ---
# A fused task owns channels c0..c1-1 and walks their pieces in order
# (fastbn.backends.cpu.fused); its statistics are these.


@inline
def slab_group_stats(x, c0, c1):
    N, _, L = x.shape
    runs, per_row, npieces = slab_pieces(N, L)
    mean = np.zeros(c1 - c0)
    m2 = np.zeros(c1 - c0)
    piece_mean = np.empty(c1 - c0)
    piece_m2 = np.empty(c1 - c0)
    pivot = np.empty(c1 - c0)
    for j in range(c1 - c0):
        pivot[j] = channel_pivot(x[0, c0 + j, 0])
    scratch = piece_scratch(x, piece_capacity(L))
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        for j in range(c1 - c0):
            piece_mean[j], piece_m2[j] = piece_stats(x, c0 + j, n0, n1, i0, i1, pivot[j], scratch)
        size = (n1 - n0) * (i1 - i0)
        merge_piece(count, mean, m2, size, piece_mean, piece_m2)
        count += size
    var = m2 / (N * L)
    for j in range(c1 - c0):
        mean[j] += pivot[j]
        if not (np.isfinite(mean[j]) and np.isfinite(var[j])):
            mean[j], var[j] = rescue_slab(x, c0 + j, pivot[j])
    return mean, var


@kernel
def stats_slab(x, group, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, fused plan."""
    x = borrowed(x)
    mean_out = borrowed(mean_out)
    var_out = borrowed(var_out)
    C = x.shape[1]
    for t in prange((C + group - 1) // group):
        c0 = t * group
        c1 = min(C, c0 + group)
        mean, var = slab_group_stats(x, c0, c1)
        mean_out[c0:c1] = mean
        var_out[c0:c1] = var


# --------------------------------------------------- SLAB, streamed plan ---
# Work runs in memory order: pieces in parallel, each over every channel,
# keeping one summary per (piece, channel) (16 bytes per 1 KiB of x); a
# second, tiny loop merges each channel's summaries in piece order, exactly
# as a fused task does.


@kernel
def stats_slab_streamed(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, streamed plan."""
    x = borrowed(x)
    N, C, L = x.shape
    runs, per_row, npieces = slab_pieces(N, L)
    piece_mean = np.empty((npieces, C))
    piece_m2 = np.empty((npieces, C))
    pivot = np.empty(C)
    for c in range(C):
        pivot[c] = channel_pivot(x[0, c, 0])
    for p in prange(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        owner = piece_scratch(x, piece_capacity(L))
        scratch = borrowed(owner)
        for c in range(C):
            piece_mean[p, c], piece_m2[p, c] = piece_stats(x, c, n0, n1, i0, i1, pivot[c], scratch)
        kept(owner)
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        size = (n1 - n0) * (i1 - i0)
        merge_piece(count, mean, m2, size, piece_mean[p], piece_m2[p])
        count += size
    var = m2 / (N * L)
    for c in range(C):
        mean[c] += pivot[c]
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            mean[c], var[c] = rescue_slab(x, c, pivot[c])
    mean_out[:] = mean
    var_out[:] = var


@kernel
def backward_reduce_slab(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (N, C, L) views, streamed, in float64.

    ``g`` is dy, masked where the ReLU output ``m`` is not > 0 unless ``m`` is None.
    """
    dy = borrowed(dy)
    m = borrowed(m)
    x = borrowed(x)
    mean = borrowed(mean)
    N, C, L = x.shape
    runs, per_row, npieces = slab_pieces(N, L)
    piece_dy = np.empty((npieces, C))
    piece_dotp = np.empty((npieces, C))
    for p in prange(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        for c in range(C):
            piece_dy[p, c], piece_dotp[p, c] = piece_grad_sums(dy, m, x, c, n0, n1, i0, i1, np.float64(mean[c]))
    sum_dy = np.zeros(C)
    dotp = np.zeros(C)
    for p in range(npieces):
        add_piece(sum_dy, piece_dy[p])
        add_piece(dotp, piece_dotp[p])
    for c in range(C):
        if not (np.isfinite(sum_dy[c]) and np.isfinite(dotp[c])):
            sum_dy[c], dotp[c] = rescue_grad_slab(dy, m, x, c, np.float64(mean[c]))
    sum_dy_out[:] = sum_dy
    dotp_out[:] = dotp


# --------------------------------------------------- ROWS, streamed plan ---
@inline
def lane_scratch(x, size):
    """``rows_block_lanes``' scratch for float32 input (three float32 and two float64 arrays), else empty ones."""
    n = size if single(x) else 0
    return (
        np.empty(n, np.float32),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
        np.empty(n, np.float64),
        np.empty(n, np.float64),
    )


@inline
def rows_block_lanes(x, r0, r1, pivot, k32, acc, acc2, dev, sq, block_mean, block_m2):
    # Rows r0..r1-1 of a float32 (M, C) view (see "error bound", float32 ROWS): block_mean (of x - pivot)
    # and block_m2, float64, from float32 sums over sub-blocks of SUB_ROWS rows added in float64.  Pass 1
    # sums x - K (K = pivot, a float32 value); pass 2 sums d = x - c and d^2 around c = fl32(K + m).
    # k32, acc, acc2 (float32) and dev, sq (float64) are the caller's scratch of C elements, reused per block.
    C = x.shape[1]
    size = r1 - r0
    for j in range(C):
        k32[j] = np.float32(pivot[j])
    dev[:] = 0.0
    sq[:] = 0.0
    for s0 in range(r0, r1, SUB_ROWS):
        s1 = min(r1, s0 + SUB_ROWS)
        acc[:] = 0.0
        for r in range((s1 - s0) // 2):
            cols_sum2(x[s0 + 2 * r], x[s0 + 2 * r + 1], k32, acc)
        if (s1 - s0) % 2:
            cols_sum(x[s1 - 1], k32, acc)
        for j in range(C):
            dev[j] += np.float64(acc[j])
    centre = k32  # reused: the pivots are not needed again
    for j in range(C):
        centre[j] = np.float32(pivot[j] + dev[j] / size)
    dev[:] = 0.0
    for s0 in range(r0, r1, SUB_ROWS):
        s1 = min(r1, s0 + SUB_ROWS)
        acc[:] = 0.0
        acc2[:] = 0.0
        for r in range((s1 - s0) // 2):
            cols_centred_sums2(x[s0 + 2 * r], x[s0 + 2 * r + 1], centre, acc2, acc)
        if (s1 - s0) % 2:
            cols_centred_sums(x[s1 - 1], centre, acc2, acc)
        for j in range(C):
            dev[j] += np.float64(acc[j])
            sq[j] += np.float64(acc2[j])
    centred_block_moments(centre, pivot, dev, sq, size, block_mean, block_m2)


@kernel
def stats_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (M, C) view, streamed plan.

    Each block of rows gets an exact two-pass (mean, M2) while it sits in
    cache; blocks are merged with Chan's formula, first within a chunk, then
    across chunks.  float64 input accumulates in float64; float32 in
    float32 over sub-blocks of SUB_ROWS rows, added in float64; float16 and
    bfloat16 in float32, over blocks of at most LANE_BLOCK rows, with the
    corrected second pass (see "error bound").
    """
    x = borrowed(x)
    M, C = x.shape
    rows, nblocks = stats_row_block(M, C, x)
    nchunks = min(nblocks, MAX_CHUNKS)
    chunk_count = np.zeros(nchunks, np.int64)
    chunk_mean = np.zeros((nchunks, C))
    chunk_m2 = np.zeros((nchunks, C))
    pivot = np.empty(C)
    lane_pivot = stats_scratch(x, C)
    for c in range(C):
        pivot[c] = channel_pivot(x[0, c])
        lane_pivot[c] = pivot[c]
    blocks = 0 if single(x) else C  # the block arrays of the other dtypes (float32 has its lanes' scratch)
    for k in prange(nchunks):
        block_mean = stats_scratch(x, blocks)
        block_m2 = stats_scratch(x, blocks)
        block_dev = stats_scratch(x, blocks)
        wide_mean = np.empty(C)
        wide_m2 = np.empty(C)
        lanes = lane_scratch(x, C)  # float32 ROWS: rows_block_lanes' scratch, once per chunk
        count = 0
        for b in range(k * nblocks // nchunks, (k + 1) * nblocks // nchunks):
            r0 = b * rows
            r1 = min(M, r0 + rows)
            size = r1 - r0
            if single(x):
                k32, acc, acc2, dev, sq = lanes
                rows_block_lanes(x, r0, r1, pivot, k32, acc, acc2, dev, sq, wide_mean, wide_m2)
                merge_piece(count, chunk_mean[k], chunk_m2[k], size, wide_mean, wide_m2)
                count += size
                continue
            block_mean[:] = 0.0
            for r in range(size // 2):
                cols_sum2(x[r0 + 2 * r], x[r0 + 2 * r + 1], lane_pivot, block_mean)
            if size % 2:
                cols_sum(x[r1 - 1], lane_pivot, block_mean)
            for c in range(C):
                block_mean[c] /= size
            # The corrected two-pass around the centre c = K + m (rounded to the sums' type), each deviation
            # one subtraction x - c, so that no reassociation can round it at x's magnitude (the block's
            # mean from pass 1 may be, which the correction undoes), combined without reassociation.  As
            # (x - K) - m, reassociated to (x - m) - K, it measured 4e-9 of the variance for float64 and 5e-5
            # for float16 on (37, 3000) at a mean of 1e8 (3000) spreads.
            centre = block_mean
            for c in range(C):
                centre[c] = lane_pivot[c] + block_mean[c]
            block_m2[:] = 0.0
            block_dev[:] = 0.0
            for r in range(size // 2):
                cols_centred_sums2(x[r0 + 2 * r], x[r0 + 2 * r + 1], centre, block_m2, block_dev)
            if size % 2:
                cols_centred_sums(x[r1 - 1], centre, block_m2, block_dev)
            centred_block_moments(centre, lane_pivot, block_dev, block_m2, size, wide_mean, wide_m2)
            merge_piece(count, chunk_mean[k], chunk_m2[k], size, wide_mean, wide_m2)
            count += size
        chunk_count[k] = count
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0
    for k in range(nchunks):
        merge_piece(count, mean, m2, chunk_count[k], chunk_mean[k], chunk_m2[k])
        count += chunk_count[k]
    var = m2 / M
    for c in range(C):
        mean[c] += pivot[c]
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            mean[c], var[c] = rescue_rows(x, c, pivot[c])
    mean_out[:] = mean
    var_out[:] = var


@kernel
def backward_reduce_rows(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (M, C) views, in float64; g is dy masked by m (or dy)."""
    dy = borrowed(dy)
    m = borrowed(m)
    x = borrowed(x)
    mean = borrowed(mean)
    sum_dy_out = borrowed(sum_dy_out)
    dotp_out = borrowed(dotp_out)
    M, C = x.shape
    rows, nblocks = stats_row_block(M, C, x)  # chunks of at least MIN_STATS_ROWS rows, as the statistics'
    nchunks = min(nblocks, MAX_CHUNKS)
    partial_sum_dy = np.zeros((nchunks, C))
    partial_dotp = np.zeros((nchunks, C))
    # float16 and bfloat16: float32 sums over at most LANE_BLOCK rows around the float32 mean,
    # added into the float64 partials with the mean's rounding corrected (run_grad_sums_narrow)
    lane_mean = stats_scratch(x, C)
    correction = np.empty(C)
    for c in range(C):
        lane_mean[c] = mean[c]
        correction[c] = np.float64(lane_mean[c]) - np.float64(mean[c])
    for k in prange(nchunks):
        r_lo = (k * nblocks // nchunks) * rows
        r_hi = min(M, ((k + 1) * nblocks // nchunks) * rows)
        if narrow(x):
            block_dy = stats_scratch(x, C)
            block_dotp = stats_scratch(x, C)
            for b in range((r_hi - r_lo + LANE_BLOCK - 1) // LANE_BLOCK):
                b0 = r_lo + b * LANE_BLOCK
                b1 = min(r_hi, b0 + LANE_BLOCK)
                block_dy[:] = 0.0
                block_dotp[:] = 0.0
                for r in range((b1 - b0) // 2):
                    a = b0 + 2 * r
                    cols_grad_sums2(
                        dy[a], part(m, a), x[a], dy[a + 1], part(m, a + 1), x[a + 1], lane_mean, block_dy, block_dotp
                    )
                if (b1 - b0) % 2:
                    cols_grad_sums(dy[b1 - 1], part(m, b1 - 1), x[b1 - 1], lane_mean, block_dy, block_dotp)
                for c in range(C):
                    partial_sum_dy[k, c] += np.float64(block_dy[c])
                    partial_dotp[k, c] += np.float64(block_dotp[c])
        else:
            for r in range((r_hi - r_lo) // 2):
                a = r_lo + 2 * r
                cols_grad_sums2(
                    dy[a],
                    part(m, a),
                    x[a],
                    dy[a + 1],
                    part(m, a + 1),
                    x[a + 1],
                    lane_mean,
                    partial_sum_dy[k],
                    partial_dotp[k],
                )
            if (r_hi - r_lo) % 2:
                cols_grad_sums(
                    dy[r_hi - 1], part(m, r_hi - 1), x[r_hi - 1], lane_mean, partial_sum_dy[k], partial_dotp[k]
                )
    for c in prange(C):
        sum_dy = 0.0
        dotp = 0.0
        for k in range(nchunks):
            sum_dy += partial_sum_dy[k, c]
            dotp += partial_dotp[k, c]
        dotp = dotp if correction[c] == 0.0 else dotp + correction[c] * sum_dy  # (0 * inf would be NaN)
        if not (np.isfinite(sum_dy) and np.isfinite(dotp)):
            sum_dy, dotp = rescue_grad_rows(dy, m, x, c, np.float64(mean[c]))
        sum_dy_out[c] = sum_dy
        dotp_out[c] = dotp
