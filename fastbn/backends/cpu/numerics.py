"""Chan's merge and the per-channel coefficient formulas of the CPU backend, each written once.

Every statistic fastbn computes on the CPU is a set of (count, mean, M2)
summaries of x minus a per-channel pivot, each exact over a piece or block
that sits in cache, merged with Chan et al.'s formula (:func:`merge_piece`);
the error bound, and what happens on overflow, are derived in
:mod:`fastbn.backends.cpu.reductions`.  Never E[x^2] - E[x]^2, which
cancels when |mean| >> std.  (The synchronised path merges the processes'
summaries as variances, :func:`fastbn._sync.merge_moments`.)

The coefficient formulas turn float64 statistics or gradient sums into the
per-channel factors of the elementwise passes; both SLAB strategies call the
same compiled copies, so they agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from fastbn.backends.cpu.jit import elementwise, exact, kernel
from fastbn.backends.cpu.loops import cast_to


@exact
def merge_piece(count, mean, m2, size, piece_mean, piece_m2):
    """Merge a piece of ``size`` elements per channel into every channel's ``(count, mean, M2)``, in place.

    Chan et al.'s formula, exact and stable for any split: with ``n = count
    + size`` and ``delta = piece_mean - mean``, ``mean += delta * size / n``
    and ``M2 += piece_M2 + delta^2 * count * size / n``.  The count ratios
    are computed once per piece, not once per channel (they are the same for
    all channels), and the loop vectorises.  Into an empty summary the piece
    is copied: ``delta^2 * 0`` would overflow to NaN for means beyond 1e154,
    where the true result is finite.  Every merge of the CPU backend calls
    this, compiled without fast-math, so all strategies get the same bits.
    An M2 that overflows here, or a mean made NaN by an Inf, makes the
    kernels compute that channel again, scaled (``rescue_slab`` and
    ``rescue_rows`` in :mod:`fastbn.backends.cpu.reductions`).
    """
    if size == 0:
        return
    if count == 0:
        mean[:] = piece_mean
        m2[:] = piece_m2
        return
    weight = size / (count + size)
    weight_ab = count * weight
    for j in range(mean.shape[0]):
        delta = piece_mean[j] - mean[j]
        mean[j] = mean[j] + delta * weight
        m2[j] = m2[j] + piece_m2[j] + delta * delta * weight_ab


@exact
def add_piece(total, piece):
    """``total += piece``, elementwise, without fast-math: per-piece gradient partials, added in piece order."""
    for j in range(total.shape[0]):
        total[j] += piece[j]


@elementwise
def channel_forward_coefficients(mean, var, eps, weight, bias, ren_mean, ren_var, renorm, rmax, dmax):
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
def forward_coefficients(
    mean,
    var,
    eps,
    weight,
    bias,
    ren_mean,
    ren_var,
    renorm,
    rmax,
    dmax,
    invstd_out,
    r_out,
    d_out,
    used_mean_out,
    scale_out,
    shift_out,
):
    """:func:`channel_forward_coefficients` for every channel, for the streamed strategies."""
    for c in range(mean.shape[0]):
        invstd_out[c], r_out[c], d_out[c], used_mean_out[c], scale_out[c], shift_out[c] = channel_forward_coefficients(
            mean[c], var[c], eps, weight[c], bias[c], ren_mean[c], ren_var[c], renorm, rmax, dmax
        )


@elementwise
def channel_backward_coefficients(sum_dy, dotp, invstd, weight, count):
    """One channel's ``(mean_dy, k, scale)`` for dx, in ``weight``'s dtype, from its float64 gradient sums.

    ``dx = (g - mean_dy - (x - mean) * k) * scale`` with ``mean_dy = sum(g) /
    count``, ``k = sum((x - mean) g) invstd^2 / count`` and ``scale = invstd *
    weight``.  Compiled on its own without 'reassoc' (as :func:`channel_forward_coefficients`
    and the elementwise helpers are), so both strategies get the same bits.
    """
    istd = np.float64(invstd)
    return (
        cast_to(weight, sum_dy / count),
        cast_to(weight, dotp * istd * istd / count),
        cast_to(weight, istd * np.float64(weight)),
    )


@kernel(parallel=False)
def backward_coefficients(sum_dy, dotp, invstd, weight, count, mean_dy_out, k_out, scale_out):
    """:func:`channel_backward_coefficients` for every channel, for the streamed strategies."""
    for c in range(sum_dy.shape[0]):
        mean_dy_out[c], k_out[c], scale_out[c] = channel_backward_coefficients(
            sum_dy[c], dotp[c], invstd[c], weight[c], count
        )


# ------------------------------------------------------- running stats ---
@exact
def _moved(running, batch, momentum):
    """``(1 - momentum) * running + momentum * batch`` in float64, without fast-math.

    The unbiased variance is ``var * (n / (n - 1))``; with 'reassoc', LLVM may
    rewrite ``m * var * (n / (n - 1))`` as ``(m * var * n) / (n - 1)``, which
    overflows once ``n * var`` exceeds the float64 range although the result
    is finite (std 1e153 over 10^4 values gave an infinite running
    variance).  Here the caller's product ``var * correction`` arrives
    already rounded, and nothing is reassociated.
    """
    return (1.0 - momentum) * running + momentum * batch


@exact
def _moved_var(running, var, correction, momentum):
    """``(1 - momentum) * running + momentum * (var * correction)``, finite wherever the true value is.

    The unbiased variance ``var * correction`` is rounded once and never
    reassociated (see :func:`_moved`).  Where it alone overflows (a biased
    variance within a factor n / (n - 1) of the float64 limit: two values of
    +-1e154), ``(momentum * var) * correction`` is taken instead: the true
    update may well be finite (a momentum of 0.1 leaves 2e307).
    """
    unbiased = var * correction
    if np.isinf(unbiased) and not np.isinf(var):
        return (1.0 - momentum) * running + (momentum * var) * correction
    return (1.0 - momentum) * running + momentum * unbiased


@kernel(parallel=False)
def update_running(running_mean, running_var, mean, var, momentum, count):
    """PyTorch's update: unbiased variance into running_var, in place.

    Serial: a few operations per channel, far less than a parallel launch
    costs.  The arithmetic is :func:`_moved`'s, without fast-math, so that
    the update is finite wherever the true one is.
    """
    correction = count / (count - 1.0)
    for c in range(running_mean.shape[0]):
        running_mean[c] = cast_to(running_mean, _moved(np.float64(running_mean[c]), mean[c], momentum))
        running_var[c] = cast_to(running_var, _moved_var(np.float64(running_var[c]), var[c], correction, momentum))
