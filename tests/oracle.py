"""Deliberately naive float64 NumPy oracle for batch normalization.

Written from the textbook definitions (PyTorch's ``F.batch_norm`` semantics, see
/work/shared/reference/batchnorm.md); it shares no code with fastbn and never imports it.
Everything is computed in float64 with whole-array NumPy reductions over all axes but the
channel axis.  Inputs are never modified; new running statistics are returned instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def channel_axis(ndim: int, axis: int) -> int:
    """The non-negative channel axis (the oracle trusts its callers: no validation)."""
    return axis + ndim if axis < 0 else axis


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis except the channel axis: the axes a per-channel statistic reduces over."""
    ax = channel_axis(ndim, axis)
    return tuple(i for i in range(ndim) if i != ax)


def per_channel(values, ndim: int, axis: int) -> np.ndarray:
    """A (C,) vector reshaped so that it broadcasts along the channel axis of an ndim array."""
    shape = [1] * ndim
    shape[channel_axis(ndim, axis)] = -1
    return np.asarray(values, dtype=np.float64).reshape(shape)


def channel_count(shape: tuple[int, ...], axis: int) -> int:
    """Number of elements per channel."""
    ax = channel_axis(len(shape), axis)
    return int(np.prod([d for i, d in enumerate(shape) if i != ax], dtype=np.int64))


def oracle_moments(x, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, two passes in float64.

    The second pass uses the corrected two-pass formula (subtracting the square of the
    sum of deviations), which removes the first-order effect of rounding in the mean.
    """
    x64 = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x64.ndim, axis)
    n = channel_count(x64.shape, axis)
    mean = np.sum(x64, axis=axes) / n
    dev = x64 - per_channel(mean, x64.ndim, axis)
    var = (np.sum(dev * dev, axis=axes) - np.sum(dev, axis=axes) ** 2 / n) / n
    return mean, var


def oracle_normalize(x, mean, var, weight=None, bias=None, *, eps=1e-5, axis=1) -> np.ndarray:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    nd = x64.ndim
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    y = (x64 - per_channel(mean, nd, axis)) * per_channel(invstd, nd, axis)
    if weight is not None:
        y = y * per_channel(weight, nd, axis)
    if bias is not None:
        y = y + per_channel(bias, nd, axis)
    return y


class OracleForward(NamedTuple):
    y: np.ndarray  # float64, x's shape
    running_mean: np.ndarray | None  # float64 updated copy (or the unchanged input), None if not given
    running_var: np.ndarray | None
    mean: np.ndarray  # the mean used to normalise (batch mean or running mean)
    invstd: np.ndarray  # 1 / sqrt(var + eps) for the variance used to normalise
    batch_stats: bool  # batch statistics were used
    count: int  # elements per channel


def oracle_forward(
    x,
    weight=None,
    bias=None,
    *,
    running_mean=None,
    running_var=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    axis=1,
) -> OracleForward:
    """Batch-norm forward with PyTorch semantics, in float64.

    training=True: normalise with batch mean / biased variance and, when running stats
    are given, return them updated (unbiased variance n/(n-1) in the update).
    training=False with running stats: normalise with them, no update.
    training=False without running stats: batch statistics (track_running_stats=False).
    """
    x64 = np.asarray(x, dtype=np.float64)
    n = channel_count(x64.shape, axis)
    has_running = running_mean is not None
    batch_stats = training or not has_running
    new_rm = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    new_rv = None if running_var is None else np.array(running_var, dtype=np.float64)
    if batch_stats:
        mean, var = oracle_moments(x64, axis)
        if training and has_running:
            new_rm = (1.0 - momentum) * new_rm + momentum * mean
            new_rv = (1.0 - momentum) * new_rv + momentum * var * (n / (n - 1))
    else:
        mean, var = new_rm.copy(), new_rv.copy()
    invstd = 1.0 / np.sqrt(var + eps)
    y = oracle_normalize(x64, mean, var, weight, bias, eps=eps, axis=axis)
    return OracleForward(y, new_rm, new_rv, mean, invstd, bool(batch_stats), n)


def oracle_backward(dy, x, weight, mean, invstd, batch_stats: bool, axis: int = 1):
    """PyTorch's batch-norm backward formulas in float64; returns (dx, dweight, dbias).

    training (batch statistics):  k = dotp * invstd^2 / n
        dx = (dy - sum_dy / n - (x - mean) * k) * invstd * w
    eval (statistics are constants):  dx = dy * invstd * w
    both:  dweight = sum((x - mean) * dy) * invstd,  dbias = sum(dy)
    """
    x64 = np.asarray(x, dtype=np.float64)
    dy64 = np.asarray(dy, dtype=np.float64)
    nd = x64.ndim
    axes = reduce_axes(nd, axis)
    n = channel_count(x64.shape, axis)
    w = np.ones(x64.shape[channel_axis(nd, axis)]) if weight is None else np.asarray(weight, np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    centered = x64 - per_channel(mean, nd, axis)
    sum_dy = np.sum(dy64, axis=axes)
    dotp = np.sum(centered * dy64, axis=axes)
    if batch_stats:
        k = dotp * invstd**2 / n
        dx = (dy64 - per_channel(sum_dy / n, nd, axis) - centered * per_channel(k, nd, axis)) * per_channel(
            invstd * w, nd, axis
        )
    else:
        dx = dy64 * per_channel(invstd * w, nd, axis)
    return dx, dotp * invstd, sum_dy
