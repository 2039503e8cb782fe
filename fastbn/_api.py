"""fastbn's public functions.

Each reads top to bottom: check every argument, view the input in a layout the
kernels know, pick the backend, call it, return NumPy arrays.  All checks run
before the first kernel, so an error leaves every buffer untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastbn import _dispatch, _sync
from fastbn._validate import (
    check_axis,
    check_channel_vector,
    check_channels,
    check_eps,
    check_flag,
    check_momentum,
    check_running,
    check_x,
    stats_dtype,
)

__all__ = ["Saved", "forward", "backward", "moments", "normalize"]


class Saved(NamedTuple):
    """What :func:`forward` keeps for :func:`backward`.

    Attributes
    ----------
    mean : numpy.ndarray
        Per-channel mean used to normalise: the batch mean, or the running mean
        in eval mode.  float32 for float16/float32 input, float64 for float64.
    invstd : numpy.ndarray
        Per-channel ``1 / sqrt(var + eps)`` used to normalise, same dtype.
    batch_stats : bool
        True if batch statistics were used (training, or no running stats),
        so backward applies the training formula; False for eval mode, where
        the statistics are constants.
    count : int
        Elements per channel that the statistics were computed over.
    shape : tuple of int
        Shape of the forward input, checked again by backward.
    axis : int
        Non-negative channel axis of the forward input.
    process_group : object or None
        The process group the statistics were synchronised over (then
        ``count`` is the global count and backward synchronises too).
    """

    mean: np.ndarray
    invstd: np.ndarray
    batch_stats: bool
    count: int
    shape: tuple
    axis: int
    process_group: object = None


def forward(
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
    backend=None,
    process_group=None,
):
    """Batch-normalise ``x`` over every axis but the channel axis.

    Follows ``torch.nn.functional.batch_norm``: in training, normalise with
    the batch mean and biased variance and, if running statistics are given,
    update them in place with the unbiased variance; with ``training=False``
    and running statistics, normalise with those; with ``training=False`` and
    none, use batch statistics.

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, float32 or float64 and rank >= 2, any strides.
    weight, bias : numpy.ndarray, optional
        Per-channel scale and shift, shape ``(C,)``, in the statistics dtype
        (float32 for float16/float32 input, float64 for float64).  Default 1 and 0.
    running_mean, running_var : numpy.ndarray, optional
        Writable per-channel running statistics in the statistics dtype; both
        or neither.  Updated in place when ``training`` is True.
    training : bool, default True
        Use batch statistics (and update running ones) if True.
    momentum : float, default 0.1
        In [0, 1]: ``running = (1 - momentum) * running + momentum * batch``.
        Note that Keras and Flax use the opposite convention.
    eps : float, default 1e-5
        Positive, added to the variance before the square root.
    axis : int, default 1
        The channel axis: 1 for (N, C), (N, C, L), NCHW, NCDHW; -1 for
        channels-last.  Any valid axis, negative ones too.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.  Arguments on the other side of the
        host/device line are a ValueError.
    process_group : object, optional
        Synchronise batch statistics across processes: an mpi4py
        communicator, a torch.distributed process group, or any object with
        ``allgather`` and ``allreduce_sum`` methods (see
        ``fastbn.Collectives``).  Every process must call with the same C,
        dtype and flags; a process may hold an empty batch.  The matching
        backward synchronises too.  Unused when running statistics are used.

    Returns
    -------
    y : numpy.ndarray
        Same shape and dtype as ``x``; channels-last input gives channels-last
        output.
    saved : Saved
        What :func:`backward` needs.

    Raises
    ------
    TypeError, ValueError
        On any invalid argument, before any computation; the message starts
        with the argument's name.  In training, a channel with a single value
        is a ValueError, as in PyTorch.

    Notes
    -----
    The variance is computed in two passes (or per block and merged with
    Chan's formula), accumulated in float64: never as E[x^2] - E[x]^2.
    NaN or Inf in a channel of ``x`` make that channel's statistics and output
    NaN (and its running statistics, in training), as in PyTorch; other
    channels are unaffected.
    """
    ops, restore, (x, weight, bias, running_mean, running_var) = _dispatch.prepare(
        backend,
        [("x", x), ("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)],
    )
    x = check_x(x)
    axis = check_axis(axis, len(x.shape))
    training = check_flag(training, "training")
    momentum = check_momentum(momentum)
    eps = check_eps(eps)
    collectives = None if process_group is None else _sync.adapt(process_group)
    channels, count = check_channels(x, axis, allow_empty=collectives is not None)
    dtype = stats_dtype(x.dtype)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_channel_vector(value, name, channels, dtype)
    has_running = check_running(running_mean, running_var, channels, dtype)
    batch_stats = training or not has_running
    if training and count == 1 and collectives is None:
        raise ValueError(
            f"x: Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    if collectives is not None and not hasattr(ops, "local_moments"):
        raise ValueError(f"process_group: not supported on the {ops.name} backend yet")

    if batch_stats and collectives is not None:
        y, mean, invstd, count = _sync.forward(
            ops, collectives, x, axis, dtype, weight, bias, eps, running_mean, running_var, momentum,
            training, update=training and has_running,
        )
        return restore(y), Saved(mean, invstd, True, count, tuple(x.shape), axis, process_group)
    if batch_stats:
        y, mean, invstd = ops.forward_batch(
            x, axis, dtype, weight, bias, eps, running_mean, running_var, momentum, update=training and has_running
        )
    else:
        y, mean, invstd = ops.forward_eval(x, axis, dtype, weight, bias, eps, running_mean, running_var)
    return restore(y), Saved(mean, invstd, batch_stats, count, tuple(x.shape), axis)


def backward(dy, x, weight, saved, *, axis=1, backend=None):
    """Gradients of :func:`forward` with respect to x, weight and bias.

    Parameters
    ----------
    dy : numpy.ndarray
        Gradient of the loss with respect to forward's output; same shape and
        dtype as ``x``.
    x : numpy.ndarray
        The input that was given to forward.
    weight : numpy.ndarray or None
        The weight that was given to forward (None means 1).
    saved : Saved
        The second value forward returned for this ``x``.
    axis : int, default 1
        The channel axis, as given to forward.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``dy``.

    Returns
    -------
    dx : numpy.ndarray
        Same shape, dtype and memory order as ``x``.
    dweight, dbias : numpy.ndarray
        Per-channel, in the statistics dtype; returned even when ``weight``
        is None.

    Notes
    -----
    With batch statistics (``saved.batch_stats``), with ``k = dotp *
    invstd**2 / n``: ``dx = (dy - sum_dy / n - (x - mean) * k) * invstd *
    weight``.  In eval mode the statistics are constants: ``dx = dy * invstd *
    weight``.  In both, ``dweight = dotp * invstd`` and ``dbias = sum_dy``,
    where ``sum_dy = sum(dy)`` and ``dotp = sum((x - mean) * dy)`` per channel.
    """
    ops, restore, (dy, x, weight) = _dispatch.prepare(backend, [("dy", dy), ("x", x), ("weight", weight)])
    x = check_x(x)
    dy = check_x(dy, "dy")
    axis = check_axis(axis, len(x.shape))
    if not isinstance(saved, Saved):
        raise TypeError(
            f"saved: expected the fastbn.Saved returned by fastbn.forward, got {type(saved).__name__}"
        )
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy: expected the dtype of x ({x.dtype}), got {dy.dtype}")
    synced = saved.process_group is not None and saved.batch_stats
    channels, _ = check_channels(x, axis, allow_empty=synced)
    if tuple(saved.shape) != tuple(x.shape) or saved.axis != axis:
        raise ValueError(
            f"saved: came from forward on shape {tuple(saved.shape)} with channel axis {saved.axis}, "
            f"but x has shape {tuple(x.shape)} and axis is {axis}"
        )
    dtype = stats_dtype(x.dtype)
    check_channel_vector(saved.mean, "saved.mean", channels, dtype)
    check_channel_vector(saved.invstd, "saved.invstd", channels, dtype)
    if weight is not None:
        check_channel_vector(weight, "weight", channels, dtype)

    if synced:
        dx, dweight, dbias = _sync.backward(
            ops, _sync.adapt(saved.process_group), dy, x, axis, dtype, weight, saved.mean, saved.invstd, saved.count
        )
    else:
        dx, dweight, dbias = ops.backward(dy, x, axis, dtype, weight, saved.mean, saved.invstd, saved.batch_stats)
    return restore(dx), restore(dweight), restore(dbias)


def moments(x, axis=1, *, backend=None):
    """Per-channel mean and biased variance (``tf.nn.moments`` over all other axes).

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, float32 or float64 and rank >= 2.
    axis : int, default 1
        The channel axis.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.

    Returns
    -------
    mean, var : numpy.ndarray
        Shape ``(C,)``, float32 for float16/float32 input, float64 for float64.
        Accumulated in float64 with a two-pass / Chan-merge scheme.
    """
    ops, restore, (x,) = _dispatch.prepare(backend, [("x", x)])
    x = check_x(x)
    axis = check_axis(axis, len(x.shape))
    check_channels(x, axis)
    mean, var = ops.moments(x, axis, stats_dtype(x.dtype))
    return restore(mean), restore(var)


def normalize(x, mean, var, weight=None, bias=None, *, eps=1e-5, axis=1, backend=None):
    """Normalise with given statistics (``tf.nn.batch_normalization``).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, per channel.

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, float32 or float64 and rank >= 2.
    mean, var : numpy.ndarray
        Per-channel statistics, shape ``(C,)``, in the statistics dtype.
    weight, bias : numpy.ndarray, optional
        Per-channel scale and shift, default 1 and 0.
    eps : float, default 1e-5
        Positive, added to ``var``.
    axis : int, default 1
        The channel axis.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``.
    """
    ops, restore, (x, mean, var, weight, bias) = _dispatch.prepare(
        backend, [("x", x), ("mean", mean), ("var", var), ("weight", weight), ("bias", bias)]
    )
    x = check_x(x)
    axis = check_axis(axis, len(x.shape))
    eps = check_eps(eps)
    channels, _ = check_channels(x, axis)
    dtype = stats_dtype(x.dtype)
    for name, value in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if value is not None or name in ("mean", "var"):
            check_channel_vector(value, name, channels, dtype)
    return restore(ops.normalize(x, axis, dtype, mean, var, weight, bias, eps))
