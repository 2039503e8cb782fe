"""Second computations of the CPU reductions for channels whose ordinary sums overflowed.

See "error bound" (Overflow) in :mod:`fastbn.backends.cpu.reductions`: a channel whose mean or variance
comes out non-finite is computed again here, on values scaled by a power of two so that no sum can
overflow (:func:`rescue_scale`), and a channel whose gradient sums come out non-finite is summed again in
float64 without fast-math.  These run only for such channels, so they are plain two-pass loops.
"""

from __future__ import annotations

import math

import numpy as np

from fastbn.backends.cpu.jit import exact
from fastbn.backends.cpu.loops import gradient, load, part

_DOWN = 2.0**-600
_UP = 2.0**600


@exact
def rescue_scale(largest):
    """``(2^-e, 2^e)`` with ``2^e`` just above ``largest`` (a channel's largest ``|x|``), ``e`` within +-1000.

    The rescue sums values scaled by ``2^-e``: each is then at most 1 in magnitude, so neither the sums nor
    the squared deviations can overflow, and a channel of moderate values (bfloat16's 1e19s, whose float32
    blocks overflowed) is not scaled into underflow, as a fixed 2^-600 scaled its squares (1e-324: variance
    0).  Powers of two scale exactly.  A channel without a finite non-zero value keeps 2^-600 (its
    statistics are NaN or Inf whatever the scale).
    """
    if largest > 0.0 and np.isfinite(largest):
        e = max(-1000, min(1000, math.frexp(largest)[1]))
        return math.ldexp(1.0, -e), math.ldexp(1.0, e)
    return _DOWN, _UP


@exact
def rescue_slab(x, c, pivot):
    """Mean and biased variance of channel c of an (N, C, L) view, scaled (:func:`rescue_scale`) so no sum overflows.

    For channels whose ordinary statistics came out non-finite (see "error
    bound"); two passes over the channel, in float64, without fast-math.
    """
    N, _, L = x.shape
    largest = 0.0
    for n in range(N):
        for i in range(L):
            largest = max(largest, abs(np.float64(load(x[n, c, i]))))
    down, up = rescue_scale(largest)
    k = pivot * down
    total = 0.0
    for n in range(N):
        for i in range(L):
            total += np.float64(load(x[n, c, i])) * down - k
    mean = total / (N * L)
    m2 = 0.0
    for n in range(N):
        for i in range(L):
            d = (np.float64(load(x[n, c, i])) * down - k) - mean
            m2 += d * d
    return pivot + mean * up, (m2 / (N * L)) * up * up


@exact
def rescue_rows(x, c, pivot):
    """:func:`rescue_slab` for channel c of an (M, C) view."""
    M = x.shape[0]
    largest = 0.0
    for r in range(M):
        largest = max(largest, abs(np.float64(load(x[r, c]))))
    down, up = rescue_scale(largest)
    k = pivot * down
    total = 0.0
    for r in range(M):
        total += np.float64(load(x[r, c])) * down - k
    mean = total / M
    m2 = 0.0
    for r in range(M):
        d = (np.float64(load(x[r, c])) * down - k) - mean
        m2 += d * d
    return pivot + mean * up, (m2 / M) * up * up


@exact
def rescue_grad_slab(dy, m, x, c, mean):
    """``(sum(g), sum((x - mean) g))`` of channel c of (N, C, L) views, in float64 without fast-math.

    For channels whose ordinary sums came out non-finite: the half types sum in float32 blocks, where
    bfloat16's values near 3.4e38 overflow (x - mean alone reaches 6.8e38) though the float64 sums are
    finite.  float64 sums of float32-range values cannot overflow (2^53 terms of at most 2.4e77).
    """
    N, _, L = x.shape
    sum_dy = 0.0
    dotp = 0.0
    for n in range(N):
        g = dy[n, c]
        mask = part(m, (n, c))
        v = x[n, c]
        for i in range(L):
            gi = np.float64(gradient(g, mask, i))
            sum_dy += gi
            dotp += (np.float64(load(v[i])) - mean) * gi
    return sum_dy, dotp


@exact
def rescue_grad_rows(dy, m, x, c, mean):
    """:func:`rescue_grad_slab` for channel c of (M, C) views."""
    sum_dy = 0.0
    dotp = 0.0
    for r in range(x.shape[0]):
        gi = np.float64(gradient(dy[r], part(m, r), c))
        sum_dy += gi
        dotp += (np.float64(load(x[r, c])) - mean) * gi
    return sum_dy, dotp
