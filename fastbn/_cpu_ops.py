"""The CPU backend's operations, on validated NumPy arrays.

:mod:`fastbn._api` checks arguments and picks a backend; a backend module
(this one, or the CUDA one, which mirrors it) then does the whole operation:
views the input in a kernel layout, allocates outputs, launches the kernels of
:mod:`fastbn._cpu`, and does the small per-channel arithmetic in between.
Every function here receives arguments that have already been checked.

Per-channel statistics come out of the kernels in float64 and are rounded
once to the statistics dtype (float32 for float16/float32 input).
"""

from __future__ import annotations

import numpy as np

from fastbn import _cpu, _layout

name = "cpu"


def _parameters(weight, bias, channels, dtype):
    """weight and bias as contiguous arrays; ones and zeros when absent."""
    weight = np.ones(channels, dtype) if weight is None else np.ascontiguousarray(weight)
    bias = np.zeros(channels, dtype) if bias is None else np.ascontiguousarray(bias)
    return weight, bias


def _scale(invstd, weight):
    """invstd * weight, rounded once to the statistics dtype, as every kernel does."""
    return (invstd.astype(np.float64) * weight.astype(np.float64)).astype(weight.dtype)


def _group_views(views, groups):
    """Split kernel views (None stays None) into ``groups`` equal parts along their first axis.

    The batch axis is the outermost of both layouts (the channel axis is never
    0 with ghost batches), so the ghost batches of ``x`` are consecutive
    ranges of the view's first axis: ``outer`` of a SLAB, rows of ROWS.
    """
    if groups == 1:
        return [views]
    size = next(v for v in views if v is not None).shape[0] // groups
    return [[None if v is None else v[g * size:(g + 1) * size] for v in views] for g in range(groups)]


def _optional_view(layout, array, axis):
    """A read-only kernel view of an optional input shaped like x (residual, forward output), or None."""
    return None if array is None else _layout.readonly(_layout.same_view(layout, array, axis))


def forward_batch(x, axis, dtype, weight, bias, eps, running_mean, running_var, momentum, update, *,
                  relu=False, residual=None, renorm=None, groups=1):
    """Normalise with batch statistics; update running stats if ``update``.

    Parameters
    ----------
    relu : bool
        Apply the ReLU to the output (after adding ``residual``).
    residual : numpy.ndarray or None
        Added to the normalised output before the activation; x's shape and dtype.
    renorm : tuple of (float, float) or None
        ``(rmax, dmax)``: batch renormalization against the running statistics
        as they are before this call updates them.
    groups : int
        Ghost batches: statistics per each of ``groups`` equal consecutive
        groups of samples along axis 0.

    Returns
    -------
    y, mean, invstd, r, d
        Output like ``x`` (same memory order); the statistics used, in
        ``dtype``, shape ``(C,)`` or ``(groups, C)``; batch renormalization's
        ``r`` and ``d``, ``(C,)`` in ``dtype``, or None without ``renorm``.

    Notes
    -----
    With ghost batches, the running statistics are updated once per call,
    with the average over the groups of their means and of their unbiased
    variances (each group has the same count ``n``, so that average is
    ``n / (n - 1)`` times the average of the biased variances).
    """
    channels = x.shape[axis]
    weight, bias = _parameters(weight, bias, channels, dtype)
    layout, x_view = _layout.channel_view(x, axis)
    z_view = _optional_view(layout, residual, axis)
    y, y_view = _layout.empty_like_layout(layout, x, axis)
    ren = None if renorm is None else (np.ascontiguousarray(running_mean), np.ascontiguousarray(running_var),
                                       float(renorm[0]), float(renorm[1]))
    results = [_cpu.forward_train(layout, xg, weight, bias, eps, yg, zg, relu, ren)
               for xg, zg, yg in _group_views([x_view, z_view, y_view], groups)]
    mean64, var64, invstd64, r, d = (np.stack(parts) for parts in zip(*results))
    if update:
        count = x.size // channels // groups
        _cpu.update_running(running_mean, running_var, mean64.mean(axis=0), var64.mean(axis=0), momentum, count)
    if groups == 1:
        mean64, invstd64 = mean64[0], invstd64[0]
    if renorm is None:
        r = d = None
    else:
        r, d = r[0], d[0]
    return y, mean64.astype(dtype), invstd64.astype(dtype), r, d


def forward_eval(x, axis, dtype, weight, bias, eps, running_mean, running_var, *, relu=False, residual=None):
    """Normalise with the running statistics; returns ``(y, mean, invstd)`` (relu, residual as in forward_batch)."""
    # A copy, so that later updates of running_mean cannot change `saved`.
    mean = np.array(running_mean, dtype=dtype, order="C")
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(dtype)
    y = _normalize_with(x, axis, dtype, mean, invstd, weight, bias, relu, residual)
    return y, mean, invstd


def _normalize_with(x, axis, dtype, mean, invstd, weight, bias, relu=False, residual=None):
    weight, bias = _parameters(weight, bias, x.shape[axis], dtype)
    layout, x_view = _layout.channel_view(x, axis)
    y, y_view = _layout.empty_like_layout(layout, x, axis)
    _cpu.normalize(layout, x_view, np.ascontiguousarray(mean), _scale(invstd, weight), bias, y_view,
                   _optional_view(layout, residual, axis), relu)
    return y


def normalize(x, axis, dtype, mean, var, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel."""
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(dtype)
    return _normalize_with(x, axis, dtype, mean, invstd, weight, bias)


def moments(x, axis, dtype):
    """Per-channel mean and biased variance, in ``dtype``."""
    layout, x_view = _layout.channel_view(x, axis)
    mean, var = _cpu.stats(layout, x_view)
    return mean.astype(dtype), var.astype(dtype)


def backward(dy, x, axis, dtype, weight, mean, invstd, batch_stats, *, y=None, dresidual=False, r=None, d=None,
             groups=1):
    """Gradients ``(dx, dweight, dbias, dresidual)``; the training formula if ``batch_stats``.

    Parameters
    ----------
    y : numpy.ndarray or None
        Forward's output when it applied the ReLU: the gradient passes where
        ``y > 0``, in both passes (the mask is never stored).
    dresidual : bool
        Also return the residual's gradient (the masked ``dy``), written in
        the dx pass; otherwise the fourth value is None.
    r, d : numpy.ndarray or None
        Batch renormalization's constants: dx is the training formula with
        weight ``r * weight``; ``dweight = r * dotp * invstd + d * sum_dy``.
    groups : int
        Ghost batches: ``mean`` and ``invstd`` are ``(groups, C)``, one row per
        group; dweight and dbias are summed over the groups.
    """
    channels = x.shape[axis]
    weight, _ = _parameters(weight, None, channels, dtype)
    if r is not None:
        weight = (weight.astype(np.float64) * r.astype(np.float64)).astype(dtype)
    mean = np.ascontiguousarray(mean).reshape(groups, channels)
    invstd = np.ascontiguousarray(invstd).reshape(groups, channels)
    layout, x_view = _layout.channel_view(x, axis)
    dy_view = _layout.readonly(_layout.same_view(layout, dy, axis))
    m_view = _optional_view(layout, y, axis)
    dx, dx_view = _layout.empty_like_layout(layout, x, axis)
    dres, dres_view = _layout.empty_like_layout(layout, x, axis) if dresidual else (None, None)
    sum_dy = np.zeros(channels)
    dweight = np.zeros(channels)
    for g, (dyg, mg, xg, dxg, dresg) in enumerate(_group_views([dy_view, m_view, x_view, dx_view, dres_view],
                                                                 groups)):
        if batch_stats:
            group_dy, dotp = _cpu.backward_train(layout, dyg, xg, mean[g], invstd[g], weight, dxg, mg, dresg)
        else:
            # Eval: the statistics are constants, so dx = g * invstd * weight.
            group_dy, dotp = _cpu.backward_reduce(layout, dyg, xg, mean[g], mg)
            zeros = np.zeros(channels, dtype)
            _cpu.backward_elementwise(layout, dyg, xg, mean[g], zeros, zeros, _scale(invstd[g], weight), dxg, mg,
                                      dresg)
        sum_dy += group_dy
        dweight += dotp * invstd[g].astype(np.float64)
    if r is not None:
        dweight = dweight * r.astype(np.float64) + d.astype(np.float64) * sum_dy
    return dx, dweight.astype(dtype), sum_dy.astype(dtype), dres


# -- pieces for synchronised batch norm (fastbn._sync): the same operations,
# split where the per-channel sums must cross processes.  A process may hold
# no elements at all, so each piece accepts an empty x.


def local_moments(x, axis):
    """This process's float64 per-channel (mean, biased var); zeros if x is empty."""
    channels = x.shape[axis]
    if x.size == 0:
        return np.zeros(channels), np.zeros(channels)
    layout, x_view = _layout.channel_view(x, axis)
    return _cpu.stats(layout, x_view)


def normalize_with_stats(x, axis, dtype, mean64, var64, weight, bias, eps):
    """Normalise with given float64 statistics; returns ``(y, mean, invstd)`` in ``dtype``."""
    mean = mean64.astype(dtype)
    invstd = (1.0 / np.sqrt(var64 + eps)).astype(dtype)
    if x.size == 0:
        return np.empty(x.shape, x.dtype), mean, invstd
    return _normalize_with(x, axis, dtype, mean, invstd, weight, bias), mean, invstd


def update_running(running_mean, running_var, mean64, var64, momentum, count):
    """PyTorch's running-stat update, in place, over ``count`` elements per channel."""
    _cpu.update_running(running_mean, running_var, mean64, var64, momentum, count)


def backward_sums(dy, x, axis, mean):
    """This process's float64 per-channel ``(sum_dy, dotp)``; zeros if x is empty."""
    channels = x.shape[axis]
    if x.size == 0:
        return np.zeros(channels), np.zeros(channels)
    layout, x_view = _layout.channel_view(x, axis)
    return _cpu.backward_reduce(layout, _layout.readonly(_layout.same_view(layout, dy, axis)), x_view, np.ascontiguousarray(mean))


def backward_dx(dy, x, axis, dtype, weight, mean, invstd, sum_dy64, dotp64, count):
    """Training-formula dx from per-channel sums over ``count`` elements (global ones, when synced)."""
    if x.size == 0:
        return np.empty(x.shape, x.dtype)
    weight, _ = _parameters(weight, None, x.shape[axis], dtype)
    istd = invstd.astype(np.float64)
    layout, x_view = _layout.channel_view(x, axis)
    dx, dx_view = _layout.empty_like_layout(layout, x, axis)
    _cpu.backward_elementwise(
        layout, _layout.readonly(_layout.same_view(layout, dy, axis)), x_view, np.ascontiguousarray(mean),
        (sum_dy64 / count).astype(dtype), (dotp64 * istd * istd / count).astype(dtype),
        _scale(invstd, weight), dx_view,
    )
    return dx
