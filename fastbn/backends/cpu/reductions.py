"""CPU reduction kernels: per-channel statistics and gradient sums.

Every input reaches these kernels as a C-contiguous view of one of two
shapes (:mod:`fastbn._layout`): ``SLAB`` ``(N, C, L)``, each channel ``N``
runs of ``L`` contiguous elements (NCHW, NCL, NCDHW), or ``ROWS`` ``(M, C)``,
channels contiguous (NHWC, ``(N, C)``).

Every reduction accumulates in float64, over pieces (SLAB) or blocks of rows
(ROWS) that stay in cache between their two passes, merged with Chan's
formula (:mod:`fastbn.backends.cpu.numerics`).  Partitions and reduction
orders depend only on the shape and dtype, never on the thread count, so
results are bit-for-bit reproducible across runs and thread counts.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastbn.backends.cpu.jit import inline, kernel
from fastbn.backends.cpu.loops import (
    cols_grad_sums,
    cols_grad_sums2,
    cols_sum,
    cols_sum2,
    cols_sum_sq_dev,
    cols_sum_sq_dev2,
    part,
    row_block,
    run_grad_sums,
    run_sum_sq_dev,
    run_sum_widen,
)
from fastbn.backends.cpu.numerics import add_piece, merge_piece
from fastbn.backends.cpu.plan import MAX_CHUNKS, slab_pieces as _plain_slab_pieces


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


@inline
def piece_stats(x, c, n0, n1, i0, i1, scratch):
    # Two passes (mean, then squared deviations), both accumulated in float64:
    # never E[x^2] - E[x]^2, which cancels when |mean| >> std.  The first pass
    # keeps the piece widened to float64 in ``scratch`` (L1), so the second
    # converts nothing and DRAM sees x once.
    width = i1 - i0
    total = 0.0
    for n in range(n1 - n0):
        total += run_sum_widen(x[n0 + n, c, i0:i1], scratch[n * width:(n + 1) * width])
    size = (n1 - n0) * width
    mean = total / size
    return mean, run_sum_sq_dev(scratch[:size], mean)


@inline
def piece_grad_sums(dy, m, x, c, n0, n1, i0, i1, mean):
    sum_dy = 0.0
    dotp = 0.0
    for n in range(n1 - n0):
        run_dy, run_dotp = run_grad_sums(dy[n0 + n, c, i0:i1], part(m, (n0 + n, c, slice(i0, i1))),
                                          x[n0 + n, c, i0:i1], mean)
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
    scratch = np.empty(piece_capacity(L))
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        for j in range(c1 - c0):
            piece_mean[j], piece_m2[j] = piece_stats(x, c0 + j, n0, n1, i0, i1, scratch)
        size = (n1 - n0) * (i1 - i0)
        merge_piece(count, mean, m2, size, piece_mean, piece_m2)
        count += size
    return mean, m2 / (N * L)


@kernel
def stats_slab(x, group, mean_out, var_out):
    """Per-channel mean and biased variance of an (N, C, L) view, fused plan."""
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
    N, C, L = x.shape
    runs, per_row, npieces = slab_pieces(N, L)
    piece_mean = np.empty((npieces, C))
    piece_m2 = np.empty((npieces, C))
    for p in prange(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        scratch = np.empty(piece_capacity(L))
        for c in range(C):
            piece_mean[p, c], piece_m2[p, c] = piece_stats(x, c, n0, n1, i0, i1, scratch)
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0
    for p in range(npieces):
        n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
        size = (n1 - n0) * (i1 - i0)
        merge_piece(count, mean, m2, size, piece_mean[p], piece_m2[p])
        count += size
    mean_out[:] = mean
    var_out[:] = m2 / (N * L)


@kernel
def backward_reduce_slab(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (N, C, L) views, streamed, in float64.

    ``g`` is dy, masked where the ReLU output ``m`` is not > 0 unless ``m`` is None.
    """
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
    sum_dy_out[:] = sum_dy
    dotp_out[:] = dotp


# --------------------------------------------------- ROWS, streamed plan ---
@kernel
def stats_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of an (M, C) view, streamed plan, in float64.

    Each block of rows gets an exact two-pass (mean, M2) while it sits in
    cache; blocks are merged with Chan's formula, first within a chunk, then
    across chunks.
    """
    M, C = x.shape
    rows, nblocks = row_block(M, C)
    nchunks = min(nblocks, MAX_CHUNKS)
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
                cols_sum2(x[r0 + 2 * r], x[r0 + 2 * r + 1], block_mean)
            if (r1 - r0) % 2:
                cols_sum(x[r1 - 1], block_mean)
            for c in range(C):
                block_mean[c] /= r1 - r0
            block_m2[:] = 0.0
            for r in range((r1 - r0) // 2):
                cols_sum_sq_dev2(x[r0 + 2 * r], x[r0 + 2 * r + 1], block_mean, block_m2)
            if (r1 - r0) % 2:
                cols_sum_sq_dev(x[r1 - 1], block_mean, block_m2)
            merge_piece(count, chunk_mean[k], chunk_m2[k], r1 - r0, block_mean, block_m2)
            count += r1 - r0
        chunk_count[k] = count
    mean = np.zeros(C)
    m2 = np.zeros(C)
    count = 0
    for k in range(nchunks):
        merge_piece(count, mean, m2, chunk_count[k], chunk_mean[k], chunk_m2[k])
        count += chunk_count[k]
    mean_out[:] = mean
    var_out[:] = m2 / M


@kernel
def backward_reduce_rows(dy, m, x, mean, sum_dy_out, dotp_out):
    """Per-channel sum(g) and sum((x - mean) * g) of (M, C) views, in float64; g is dy masked by m (or dy)."""
    M, C = x.shape
    rows, nblocks = row_block(M, C)
    nchunks = min(nblocks, MAX_CHUNKS)
    partial_sum_dy = np.zeros((nchunks, C))
    partial_dotp = np.zeros((nchunks, C))
    for k in prange(nchunks):
        r_lo = (k * nblocks // nchunks) * rows
        r_hi = min(M, ((k + 1) * nblocks // nchunks) * rows)
        for r in range((r_hi - r_lo) // 2):
            a = r_lo + 2 * r
            cols_grad_sums2(dy[a], part(m, a), x[a], dy[a + 1], part(m, a + 1), x[a + 1], mean, partial_sum_dy[k],
                             partial_dotp[k])
        if (r_hi - r_lo) % 2:
            cols_grad_sums(dy[r_hi - 1], part(m, r_hi - 1), x[r_hi - 1], mean, partial_sum_dy[k], partial_dotp[k])
    for c in prange(C):
        sum_dy = 0.0
        dotp = 0.0
        for k in range(nchunks):
            sum_dy += partial_sum_dy[k, c]
            dotp += partial_dotp[k, c]
        sum_dy_out[c] = sum_dy
        dotp_out[c] = dotp
