"""CPU kernels for weighted and masked batch statistics, and their dx.

Weights ``w`` (a mask is 0/1 weights) make the statistics of a channel
``W = sum(w)``, ``mean = sum(w x) / W`` and the biased variance
``var = sum(w (x - mean)^2) / W`` (``tf.nn.weighted_moments``, frequency
weights); a channel with ``W == 0`` gets mean 0 and variance 0, as
TensorFlow's ``divide_no_nan`` and Keras give.  The output is normalised
everywhere, so the gradient of ``y = (x - mean) * invstd * g + b`` is, with
``s = invstd``, ``sum_dy = sum(dy)`` and ``dotp = sum(dy (x - mean))`` over
*all* positions (``d mean / d x_i = w_i / W`` and ``d var / d x_i = 2 w_i
(x_i - mean) / W``, the mean's term vanishing since ``sum(w (x - mean)) =
0``)::

    dx_i = g s (dy_i - w_i (sum_dy / W + (x_i - mean) s^2 dotp / W))

which :func:`weighted_dx_rows` / :func:`weighted_dx_slab` evaluate with the
per-channel ``a = sum_dy / W`` and ``b = s^2 dotp / W`` (0 where W == 0: the
statistics then do not depend on x).

Both kernels take the views of :func:`fastbn.backends.cpu.views.channel_view`
(ROWS ``(M, C)`` or SLAB ``(N, C, L)``), with ``w`` in the same layout.

Error bound (statistics).  Two passes in float64, on values shifted by a
per-channel pivot ``K`` (the channel's first element, 0 if not finite), so
that ``|x - K| <= R``, the channel's range.  With ``u = 2^-53`` and ``n`` the
channel's element count, pass 1 sums ``w (x - K)`` and ``w`` with error at
most ``gamma_n`` times the sums of absolute values (``gamma_n = n u / (1 - n
u)``, the bound of any summation order, reassociated lanes included), so the
mean ``K + S1 / W`` is off by ``|dm| <= 2 gamma_n R + u |mean|``.  Pass 2
computes ``sum w (x - m^)^2 = W var + W dm^2`` exactly up to ``gamma_{n+3}``
relative error (the cross term is ``2 dm sum w (x - mean) = 0``), hence::

    |var^ - var| <= gamma_{n+4} var + (1 + gamma_{n+4}) (2 gamma_n R + u |mean|)^2

The second term is second order in ``u``: relative to ``var`` it is about
``(n u R / std)^2 + (u mean / std)^2``, below 1e-20 for float32 input whose
mean is 1e4 standard deviations (float32 input is exact in float64).
``tests/test_weights.py`` checks the bound against exact rational sums.
Values beyond about 1e154 overflow the squares of pass 2, and sums of
values near the float64 maximum overflow pass 1, where the weighted mean
and variance are finite.  A channel whose mean or variance comes out
non-finite (with ``W > 0``) is therefore computed again, as the unweighted
kernels do, by :func:`_rescue_rows` / :func:`_rescue_slab`: on
``(x - K) * 2^-600`` and ``w / max(w)`` (the statistics do not depend on
the weights' scale), whose weighted sums cannot overflow, so the results
scaled back are infinite only where the true ones are.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from fastbn.backends.cpu.jit import borrowed, exact, kernel
from fastbn.backends.cpu.loops import cast_to, load
from fastbn.backends.cpu.rescue import rescue_scale  # the unweighted rescue's scale

# Rows per task of the ROWS statistics: a fixed count (never the thread
# count), so that the partial sums, and the result, do not depend on how
# many threads run.
_ELEMENTS_PER_TASK = 1 << 16


@exact
def _rescaled_moments(values, weights, pivot):
    """Weighted mean and biased variance of 1-D ``values``, summed on ``(v - pivot) * 2^-e`` (:func:`rescue_scale`) and
    ``weights / max(weights)``, so that no sum can overflow (see the module docstring); ``(0, 0)``
    where every weight is 0, as the kernels give for ``W == 0``."""
    top = 0.0
    for i in range(values.shape[0]):
        top = max(top, np.float64(weights[i]))
    if top == 0.0:
        return 0.0, 0.0
    largest = 0.0
    for i in range(values.shape[0]):
        largest = max(largest, abs(np.float64(load(values[i]))))
    down, up = rescue_scale(largest)
    k = pivot * down
    total = 0.0
    s1 = 0.0
    for i in range(values.shape[0]):
        wi = np.float64(weights[i]) / top
        total += wi
        s1 += wi * (np.float64(load(values[i])) * down - k)
    mean = s1 / total
    s2 = 0.0
    for i in range(values.shape[0]):
        d = (np.float64(load(values[i])) * down - k) - mean
        s2 += (np.float64(weights[i]) / top) * (d * d)
    return pivot + mean * up, (s2 / total) * up * up


@exact
def _rescue_rows(x, w, c, pivot):
    """:func:`_rescaled_moments` of channel c of an (M, C) view."""
    return _rescaled_moments(x[:, c], w[:, c], pivot)


@exact
def _rescue_slab(x, w, c, pivot):
    """:func:`_rescaled_moments` of channel c of an (N, C, L) view (copied into one row: a rare path)."""
    N, _, L = x.shape
    values = np.empty(N * L, x.dtype)
    weights = np.empty(N * L, w.dtype)
    for n in range(N):
        for i in range(L):
            values[n * L + i] = x[n, c, i]
            weights[n * L + i] = w[n, c, i]
    return _rescaled_moments(values, weights, pivot)


def rows_per_task(channels: int) -> int:
    """Rows of a ROWS view per parallel task: about 64 Ki elements, at least one row."""
    return max(1, _ELEMENTS_PER_TASK // max(1, channels))


@kernel
def weighted_stats_rows(x, w, rows):
    """``(W, mean, var)`` per channel of a ``(M, C)`` view, float64; see the module's docstring."""
    x = borrowed(x)
    w = borrowed(w)
    M, C = x.shape
    tasks = (M + rows - 1) // rows
    pivot = np.zeros(C)
    if M > 0:
        for c in range(C):
            first = np.float64(load(x[0, c]))
            pivot[c] = first if np.isfinite(first) else 0.0
    wsum = np.zeros((tasks, C))
    s1 = np.zeros((tasks, C))
    for t in prange(tasks):
        for r in range(t * rows, min(M, (t + 1) * rows)):
            for c in range(C):
                wi = np.float64(w[r, c])
                wsum[t, c] += wi
                s1[t, c] += wi * (np.float64(load(x[r, c])) - pivot[c])
    total = np.zeros(C)
    mean = np.zeros(C)
    for t in range(tasks):
        for c in range(C):
            total[c] += wsum[t, c]
            mean[c] += s1[t, c]
    for c in range(C):
        mean[c] = pivot[c] + mean[c] / total[c] if total[c] > 0 else 0.0
    s2 = np.zeros((tasks, C))
    for t in prange(tasks):
        for r in range(t * rows, min(M, (t + 1) * rows)):
            for c in range(C):
                d = np.float64(load(x[r, c])) - mean[c]
                s2[t, c] += np.float64(w[r, c]) * (d * d)
    var = np.zeros(C)
    for t in range(tasks):
        for c in range(C):
            var[c] += s2[t, c]
    for c in range(C):
        var[c] = var[c] / total[c] if total[c] > 0 else 0.0
        if total[c] > 0 and not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            mean[c], var[c] = _rescue_rows(x, w, c, pivot[c])
    return total, mean, var


@kernel
def weighted_stats_slab(x, w):
    """``(W, mean, var)`` per channel of a ``(N, C, L)`` view, float64; one task per channel."""
    x = borrowed(x)
    w = borrowed(w)
    N, C, L = x.shape
    total = np.zeros(C)
    mean = np.zeros(C)
    var = np.zeros(C)
    for c in prange(C):
        pivot = 0.0
        if N > 0 and L > 0:
            first = np.float64(load(x[0, c, 0]))
            pivot = first if np.isfinite(first) else 0.0
        wsum = 0.0
        s1 = 0.0
        for n in range(N):
            for i in range(L):
                wi = np.float64(w[n, c, i])
                wsum += wi
                s1 += wi * (np.float64(load(x[n, c, i])) - pivot)
        m = pivot + s1 / wsum if wsum > 0 else 0.0
        s2 = 0.0
        for n in range(N):
            for i in range(L):
                d = np.float64(load(x[n, c, i])) - m
                s2 += np.float64(w[n, c, i]) * (d * d)
        total[c] = wsum
        mean[c] = m
        var[c] = s2 / wsum if wsum > 0 else 0.0
        if wsum > 0 and not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            mean[c], var[c] = _rescue_slab(x, w, c, pivot)
    return total, mean, var


@kernel
def weighted_dx_rows(dy, x, w, mean, a, b, scale, dx):
    """``dx = scale (dy - w (a + (x - mean) b))`` over a ``(M, C)`` view, per-channel float64 coefficients."""
    dy = borrowed(dy)
    x = borrowed(x)
    w = borrowed(w)
    mean = borrowed(mean)
    a = borrowed(a)
    b = borrowed(b)
    scale = borrowed(scale)
    dx = borrowed(dx)
    M, C = x.shape
    for r in prange(M):
        for c in range(C):
            g = np.float64(load(dy[r, c]))
            v = np.float64(load(x[r, c]))
            wi = np.float64(w[r, c])
            dx[r, c] = cast_to(dx, scale[c] * (g - wi * (a[c] + (v - mean[c]) * b[c])))


@kernel
def weighted_dx_slab(dy, x, w, mean, a, b, scale, dx):
    """As :func:`weighted_dx_rows`, over a ``(N, C, L)`` view."""
    dy = borrowed(dy)
    x = borrowed(x)
    w = borrowed(w)
    mean = borrowed(mean)
    a = borrowed(a)
    b = borrowed(b)
    scale = borrowed(scale)
    dx = borrowed(dx)
    N, C, L = x.shape
    for n in prange(N):
        for c in range(C):
            for i in range(L):
                g = np.float64(load(dy[n, c, i]))
                v = np.float64(load(x[n, c, i]))
                wi = np.float64(w[n, c, i])
                dx[n, c, i] = cast_to(dx, scale[c] * (g - wi * (a[c] + (v - mean[c]) * b[c])))
