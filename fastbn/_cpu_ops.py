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


def forward_batch(x, axis, dtype, weight, bias, eps, running_mean, running_var, momentum, update):
    """Normalise with batch statistics; update running stats if ``update``.

    Returns
    -------
    y, mean, invstd
        Output like ``x`` (same memory order), and the statistics used, in ``dtype``.
    """
    channels, count = x.shape[axis], x.size // x.shape[axis]
    weight, bias = _parameters(weight, bias, channels, dtype)
    layout, x_view = _layout.channel_view(x, axis)
    y, y_view = _layout.empty_like_layout(layout, x, axis)
    mean64, var64, invstd64 = _cpu.forward_train(layout, x_view, weight, bias, eps, y_view)
    if update:
        _cpu.update_running(running_mean, running_var, mean64, var64, momentum, count)
    return y, mean64.astype(dtype), invstd64.astype(dtype)


def forward_eval(x, axis, dtype, weight, bias, eps, running_mean, running_var):
    """Normalise with the running statistics; returns ``(y, mean, invstd)``."""
    # A copy, so that later updates of running_mean cannot change `saved`.
    mean = np.array(running_mean, dtype=dtype, order="C")
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(dtype)
    y = _normalize_with(x, axis, dtype, mean, invstd, weight, bias)
    return y, mean, invstd


def _normalize_with(x, axis, dtype, mean, invstd, weight, bias):
    weight, bias = _parameters(weight, bias, x.shape[axis], dtype)
    layout, x_view = _layout.channel_view(x, axis)
    y, y_view = _layout.empty_like_layout(layout, x, axis)
    _cpu.normalize(layout, x_view, np.ascontiguousarray(mean), _scale(invstd, weight), bias, y_view)
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


def backward(dy, x, axis, dtype, weight, mean, invstd, batch_stats):
    """Gradients ``(dx, dweight, dbias)``; the training formula if ``batch_stats``."""
    channels = x.shape[axis]
    weight, _ = _parameters(weight, None, channels, dtype)
    mean = np.ascontiguousarray(mean)
    invstd = np.ascontiguousarray(invstd)
    layout, x_view = _layout.channel_view(x, axis)
    dy_view = _layout.readonly(_layout.same_view(layout, dy, axis))
    dx, dx_view = _layout.empty_like_layout(layout, x, axis)
    if batch_stats:
        sum_dy, dotp = _cpu.backward_train(layout, dy_view, x_view, mean, invstd, weight, dx_view)
    else:
        # Eval: the statistics are constants, so dx = dy * invstd * weight.
        sum_dy, dotp = _cpu.backward_reduce(layout, dy_view, x_view, mean)
        zeros = np.zeros(channels, dtype)
        _cpu.backward_elementwise(layout, dy_view, x_view, mean, zeros, zeros, _scale(invstd, weight), dx_view)
    dweight = (dotp * invstd.astype(np.float64)).astype(dtype)
    return dx, dweight, sum_dy.astype(dtype)


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
