"""CPU fused SLAB kernels: a task's statistics (or gradient sums), then its output, from cache.

A task owns channels ``c0..c1-1`` (one, unless runs are short: see
:func:`fastbn.backends.cpu.plan.slab_group`) and walks their pieces in
order, so its channels are read from DRAM once and re-read from cache by the
output pass: training forward costs one read of x and one write of y,
training backward one read of x and dy and one write of dx.  The pieces,
their order and every compiled helper are those of the streamed kernels, so
the two strategies agree bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastbn.backends.cpu.elementwise import emit_affine, emit_dx
from fastbn.backends.cpu.jit import borrowed, kernel
from fastbn.backends.cpu.loops import scratch_for
from fastbn.backends.cpu.numerics import add_piece, channel_backward_coefficients, channel_forward_coefficients
from fastbn.backends.cpu.plan import STREAM_CHUNK
from fastbn.backends.cpu.reductions import piece_grad_sums, slab_group_stats, slab_piece, slab_pieces
from fastbn.backends.cpu.rescue import rescue_grad_slab


@kernel
def forward_train_slab(
    x,
    z,
    group,
    weight,
    bias,
    eps,
    floor,
    ren_mean,
    ren_var,
    renorm,
    rmax,
    dmax,
    y,
    nt,
    mean_out,
    var_out,
    invstd_out,
    r_out,
    d_out,
):
    """Fused training forward: a group's statistics, then its output, from cache.

    ``y = max((x - mean) * scale + shift + z, floor)``: ``z`` (the residual)
    may be None; ``floor`` is 0 for the ReLU, -inf for none; ``nt`` selects
    non-temporal stores (see "output spans").
    """
    x = borrowed(x)
    z = borrowed(z)
    weight = borrowed(weight)
    bias = borrowed(bias)
    eps = borrowed(eps)
    floor = borrowed(floor)
    ren_mean = borrowed(ren_mean)
    ren_var = borrowed(ren_var)
    renorm = borrowed(renorm)
    rmax = borrowed(rmax)
    dmax = borrowed(dmax)
    y = borrowed(y)
    nt = borrowed(nt)
    mean_out = borrowed(mean_out)
    var_out = borrowed(var_out)
    invstd_out = borrowed(invstd_out)
    r_out = borrowed(r_out)
    d_out = borrowed(d_out)
    N, C, _ = x.shape
    for t in prange((C + group - 1) // group):
        c0 = t * group
        c1 = min(C, c0 + group)
        mean, var = slab_group_stats(x, c0, c1)
        used_mean = np.empty_like(weight[c0:c1])
        scale = np.empty_like(weight[c0:c1])
        shift = np.empty_like(weight[c0:c1])
        for j in range(c1 - c0):
            c = c0 + j
            mean_out[c] = mean[j]
            var_out[c] = var[j]
            invstd_out[c], r_out[c], d_out[c], used_mean[j], scale[j], shift[j] = channel_forward_coefficients(
                mean[j], var[j], eps, weight[c], bias[c], ren_mean[c], ren_var[c], renorm, rmax, dmax
            )
        scratch = scratch_for(nt, y, STREAM_CHUNK)
        for n in range(N):
            emit_affine(x, z, used_mean, scale, shift, floor, c0, n, c0, c1, y, scratch)


@kernel
def backward_train_slab(dy, m, x, dres, group, mean, invstd, weight, dx, nt, sum_dy_out, dotp_out):
    """Fused training backward: a group's gradient sums, then its dx, from cache.

    ``m`` is the ReLU's output (the gradient passes where it is > 0) or None;
    ``dres``, the residual's gradient (the masked dy), is written alongside
    dx, or is None.  ``nt`` as in :func:`forward_train_slab`.
    """
    dy = borrowed(dy)
    m = borrowed(m)
    x = borrowed(x)
    dres = borrowed(dres)
    mean = borrowed(mean)
    invstd = borrowed(invstd)
    weight = borrowed(weight)
    dx = borrowed(dx)
    nt = borrowed(nt)
    sum_dy_out = borrowed(sum_dy_out)
    dotp_out = borrowed(dotp_out)
    N, C, L = x.shape
    runs, per_row, npieces = slab_pieces(N, L)
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
            n0, n1, i0, i1 = slab_piece(p, N, L, runs, per_row)
            for j in range(w):
                piece_dy[j], piece_dotp[j] = piece_grad_sums(dy, m, x, c0 + j, n0, n1, i0, i1, np.float64(mean[c0 + j]))
            add_piece(sum_dy, piece_dy)
            add_piece(dotp, piece_dotp)
        for j in range(w):
            if not (np.isfinite(sum_dy[j]) and np.isfinite(dotp[j])):
                sum_dy[j], dotp[j] = rescue_grad_slab(dy, m, x, c0 + j, np.float64(mean[c0 + j]))
        mean_dy = np.empty_like(weight[c0:c1])
        k = np.empty_like(weight[c0:c1])
        scale = np.empty_like(weight[c0:c1])
        for j in range(w):
            sum_dy_out[c0 + j] = sum_dy[j]
            dotp_out[c0 + j] = dotp[j]
            mean_dy[j], k[j], scale[j] = channel_backward_coefficients(
                sum_dy[j], dotp[j], invstd[c0 + j], weight[c0 + j], count
            )
        scratch = scratch_for(nt, dx, STREAM_CHUNK)
        dres_scratch = scratch_for(nt, dres, STREAM_CHUNK)
        for n in range(N):
            emit_dx(dy, m, x, dres, mean[c0:c1], mean_dy, k, scale, c0, n, c0, c1, dx, scratch, dres_scratch)
