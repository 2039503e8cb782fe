"""fastbn's step-by-step functions: :func:`moments`, :func:`normalize` and :func:`fold`.

They read as :mod:`fastbn._api`'s functions do: pick the backend and bring the
arrays to it, check every argument, call the backend, return the caller's kind
of array; all checks run before the first kernel.  Their TensorFlow-style
arguments (reduction axes, weights, masks, broadcast parameters) are resolved
by :mod:`fastbn._weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fastbn import _dispatch, _options, _weights
from fastbn._typing import ArrayT, BackendName, OptionalArray, Plan
from fastbn._validate import (
    check_axis,
    check_channel_vector,
    check_channels,
    check_variance,
    check_x,
    sequence_conversion,
    stats_dtype,
)

__all__ = ["fold", "moments", "normalize"]


def moments(
    x: ArrayT,
    axis: int | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    keepdims: bool = False,
    weights: npt.ArrayLike | None = None,
    mask: npt.ArrayLike | None = None,
    backend: BackendName = None,
    _plan: Plan = None,
) -> tuple[ArrayT, ArrayT]:
    """Mean and biased variance per channel, or over named axes (``tf.nn.moments``).

    Two forms: name the channel axis (``axis``, fastbn's and PyTorch's form:
    one statistic per channel, over every other axis), or the reduction axes
    (``axes``, TensorFlow's form: every axis not named is kept).

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, bfloat16 (CPU only), float32 or float64 and
        rank >= 1 (rank >= 2 with ``axis``).
    axis : int, optional
        The channel axis; default 1 when ``axes`` is not given.
    axes : int or sequence of int, optional
        The axes to reduce over, as ``tf.nn.moments(x, axes)``; not together
        with ``axis``.  ``axes=[0, 1, 2]`` on NHWC input is ``axis=-1``.
        Several kept axes (``axes=[0]`` on ``(N, H, W, C)`` gives ``(H, W, C)``
        statistics) run on the CPU only; the input is then reordered first,
        a copy unless the kept axes are already the innermost ones.
    keepdims : bool, default False
        Return results of x's rank, with the reduced axes of size 1, ready to
        broadcast against ``x`` (and to pass to :func:`normalize`).
    weights : numpy.ndarray, optional
        Finite non-negative weights broadcastable to x (frequency weights,
        ``tf.nn.weighted_moments``): ``mean = sum(w x) / sum(w)``, ``var =
        sum(w (x - mean)^2) / sum(w)``.  Where ``sum(w)`` is 0, mean and
        variance are 0, as TensorFlow and Keras give.  CPU only.
    mask : numpy.ndarray of bool, optional
        Positions that count (True) and those left out; broadcastable to x
        or, with ``axis``, of x's shape without the channel axis (Keras's
        mask of a ``(N, T, C)`` sequence batch is ``(N, T)``).  The same as
        ``weights=mask``.  CPU only.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.
    _plan : mapping, optional
        Private, for tests: CPU plan fields to force, as for :func:`forward`.

    Returns
    -------
    mean, var : numpy.ndarray
        Shape ``(C,)`` (or the kept axes' shape; x's rank with ``keepdims``),
        float32 for float16/bfloat16/float32 input, float64 for float64.  An
        empty batch gives NaN, as NumPy and TensorFlow do.

    Notes
    -----
    Two passes, or per block and merged with Chan's formula, on values
    shifted by a per-channel pivot: never E[x^2] - E[x]^2.  The weighted
    kernels' error bound is derived in :mod:`fastbn.backends.cpu.weighted`.
    TensorFlow returns float16 statistics for float16 input; fastbn keeps
    them in float32.

    Examples
    --------
    >>> fastbn.moments(np.arange(8, dtype=np.float32).reshape(4, 2))
    (array([3., 4.], dtype=float32), array([5., 5.], dtype=float32))
    >>> x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> fastbn.moments(x, axes=[0, 2], keepdims=True)[0].shape
    (1, 2, 1)
    >>> fastbn.moments(np.float32([[1], [3], [100]]), mask=np.array([True, True, False]), axis=1)
    (array([2.], dtype=float32), array([1.], dtype=float32))
    """
    given = x
    ops, restore, (x, weights, mask) = _dispatch.prepare(backend, [("x", x), ("weights", weights), ("mask", mask)])
    x = check_x(x, min_rank=1 if axes is not None else 2)
    keepdims = _options.check_flag(keepdims, "keepdims")
    sequence_conversion(given, x, "x", (("weights", weights), ("mask", mask)))
    ndim = len(x.shape)
    shape = tuple(x.shape)
    dtype = stats_dtype(x.dtype)
    if axes is not None:
        if axis is not None:
            raise ValueError("axis, axes: give the channel axis or the reduction axes, not both")
        reduced = _weights.reduction_axes(axes, ndim)
        kept = tuple(i for i in range(ndim) if i not in reduced)
        if len(kept) == 1:
            axis, reduced = kept[0], ()
    else:
        axis = check_axis(1 if axis is None else axis, ndim)
        reduced = ()
    if axis is not None:
        reduced = tuple(i for i in range(ndim) if i != axis)
        check_channels(x, axis, allow_empty=True)
    out_shape = _weights.kept_shape(shape, reduced, keepdims)
    w = _weights.check_weights(weights, mask, shape, axis, dtype)
    if (w is not None or axis is None) and ops.name != "cpu":
        raise ValueError(
            f"{'weights' if weights is not None else 'mask' if mask is not None else 'axes'}: "
            f"not supported on the {ops.name} backend yet (weights, masks and several kept axes run on the CPU)"
        )
    if axis is None:  # several kept axes (or none): one channel per kept position
        x2, channel_axis = _weights.as_rows(x, reduced), 1
        w2 = None if w is None else _weights.as_rows(w, reduced)
    else:
        x2, channel_axis, w2 = x, axis, w
    count = math.prod(x2.shape) // x2.shape[channel_axis] if x2.shape[channel_axis] else 0
    if w2 is not None:
        _, mean64, var64 = ops.weighted_moments(x2, w2, channel_axis)
        mean, var = mean64.astype(dtype), var64.astype(dtype)
    elif count == 0:
        mean, var = (ops.from_host(np.full(x2.shape[channel_axis], np.nan, dtype)) for _ in range(2))
    else:
        mean, var = ops.moments(x2, channel_axis, dtype, plan=_plan)
    if out_shape != (x2.shape[channel_axis],):
        mean, var = mean.reshape(out_shape), var.reshape(out_shape)
    return restore(mean), restore(var)


def normalize(
    x: ArrayT,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    weight: OptionalArray = None,
    bias: OptionalArray = None,
    *,
    eps: float = 1e-5,
    axis: int | None = None,
    backend: BackendName = None,
    _plan: Plan = None,
) -> ArrayT:
    """Normalise with given statistics (``tf.nn.batch_normalization``).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, per channel.

    Parameters
    ----------
    x : numpy.ndarray
        Input of dtype float16, bfloat16 (CPU only), float32 or float64 and
        rank >= 2.
    mean, var : numpy.ndarray
        Per-channel statistics: shape ``(C,)`` (per channel whatever the
        channel axis), or any shape that broadcasts to x and varies only along
        the channel axis, as TensorFlow and Keras take them: ``(1, 1, 1, C)``
        for NHWC, ``(1, C, 1, 1)`` for NCHW, :func:`moments`' ``keepdims``
        results, a scalar.  Any floating dtype; rounded to the statistics
        dtype (float32 for float16/bfloat16/float32 input, float64 for
        float64).  On CUDA, exactly ``(C,)`` in the statistics dtype.
    weight, bias : numpy.ndarray, optional
        Per-channel scale and shift, shaped as ``mean``; default 1 and 0.
    eps : float, default 1e-5
        Positive, added to ``var``.
    axis : int, optional
        The channel axis, default 1; -1 for channels-last.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``x``.
    _plan : mapping, optional
        Private, for tests: CPU plan fields to force, as for :func:`forward`.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``.

    Examples
    --------
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)  # (N, C): 4 samples, 2 channels
    >>> np.round(fastbn.normalize(x, *fastbn.moments(x))[:, 1], 3)
    array([-1.342, -0.447,  0.447,  1.342], dtype=float32)
    """
    given = x
    ops, restore, (x, mean, var, weight, bias) = _dispatch.prepare(
        backend, [("x", x), ("mean", mean), ("var", var), ("weight", weight), ("bias", bias)]
    )
    x = check_x(x)
    sequence_conversion(given, x, "x", (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)))
    axis = check_axis(1 if axis is None else axis, len(x.shape))
    eps = _options.check_eps(eps)
    channels, count = check_channels(x, axis, allow_empty=True)
    dtype = stats_dtype(x.dtype)
    _options.check_eps_range(eps, dtype)  # a zero var (moments of a constant channel) must not give NaN
    params = {"mean": mean, "var": var, "weight": weight, "bias": bias}
    for name, value in params.items():
        if value is None and name in ("mean", "var"):
            raise TypeError(f"{name}: expected an array of shape ({channels},), got None")
        if value is None:
            continue
        if ops.name == "cpu":
            params[name] = _weights.channel_parameter(value, name, tuple(x.shape), axis, dtype)
        else:
            check_channel_vector(value, name, channels, dtype)
    mean, var, weight, bias = params.values()
    check_variance(var, "var")
    if count == 0:
        empty: ArrayT = restore(ops.from_host(np.empty(tuple(x.shape), x.dtype)))
        return empty
    y: ArrayT = restore(ops.normalize(x, axis, dtype, mean, var, weight, bias, eps, plan=_plan))
    return y


def fold(
    layer_weight: ArrayT,
    layer_bias: OptionalArray,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    weight: OptionalArray,
    bias: OptionalArray,
    eps: float = 1e-5,
    axis: int = 0,
    *,
    backend: BackendName = None,
) -> tuple[ArrayT, ArrayT]:
    """Fold eval-mode batch norm into the dense or convolution layer before it.

    For a layer ``u = W x + c`` followed by eval-mode batch norm
    ``y = (u - running_mean) / sqrt(running_var + eps) * weight + bias``, return
    the ``(W', c')`` of one layer computing ``y`` directly: with ``s = weight /
    sqrt(running_var + eps)``, ``W' = s * W`` along W's output-channel axis and
    ``c' = s * (c - running_mean) + bias``.  Inference then skips the batch
    norm entirely.

    Parameters
    ----------
    layer_weight : numpy.ndarray
        The layer's weight, float16, bfloat16 (CPU only), float32 or float64,
        rank >= 2: ``(out, in)`` for a dense layer, ``(out, in, *kernel)``
        for a PyTorch convolution.
    layer_bias : numpy.ndarray or None
        The layer's bias, shape ``(C,)`` with ``C = layer_weight.shape[axis]``,
        of layer_weight's dtype; None for a layer without bias.
    running_mean, running_var : numpy.ndarray
        The batch norm's running statistics, ``(C,)``, in the statistics dtype
        of layer_weight (float32 for float16/bfloat16/float32, float64 for
        float64).
    weight, bias : numpy.ndarray or None
        The batch norm's affine parameters, ``(C,)``, same dtype; None means 1 and 0.
    eps : float, default 1e-5
        The batch norm's eps.
    axis : int, default 0
        The output-channel axis of ``layer_weight``: 0 for dense layers and
        PyTorch's ``Conv*d``, 1 for ``ConvTranspose*d``, -1 for a Keras/JAX
        ``(in, out)`` kernel.
    backend : {None, "cpu", "cuda"}, default None
        Where to run; None follows ``layer_weight``.

    Returns
    -------
    folded_weight : numpy.ndarray
        Shape and dtype of ``layer_weight``.
    folded_bias : numpy.ndarray
        Shape ``(C,)``, dtype of ``layer_weight`` (a bias is returned even when
        the layer had none).

    Notes
    -----
    Computed in float64 (on the CPU) and rounded once to the layer's dtype.

    Examples
    --------
    >>> w, c = np.ones((2, 3), np.float32), np.zeros(2, np.float32)  # a dense layer, 3 in, 2 out
    >>> w, c = fastbn.fold(w, c, np.array([1, 2], np.float32), np.array([4, 1], np.float32), None, None)
    >>> np.round(w[:, 0], 3), np.round(c, 3)
    (array([0.5, 1. ], dtype=float32), array([-0.5, -2. ], dtype=float32))
    """
    given = layer_weight
    ops, restore, (layer_weight, layer_bias, running_mean, running_var, weight, bias) = _dispatch.prepare(
        backend,
        [
            ("layer_weight", layer_weight),
            ("layer_bias", layer_bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ],
        read_only=("running_mean", "running_var"),  # only read: a list is taken as for any input
    )
    layer_weight = check_x(layer_weight, "layer_weight")
    sequence_conversion(
        given,
        layer_weight,
        "layer_weight",
        (
            ("layer_bias", layer_bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ),
    )
    axis = check_axis(axis, len(layer_weight.shape))
    eps = _options.check_eps(eps)
    channels, _ = check_channels(layer_weight, axis, "layer_weight")
    if layer_bias is not None:
        check_channel_vector(layer_bias, "layer_bias", channels, np.dtype(layer_weight.dtype))
    dtype = stats_dtype(layer_weight.dtype)
    for name, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if value is not None or name.startswith("running"):
            check_channel_vector(value, name, channels, dtype)
    check_variance(running_var, "running_var")
    folded_weight, folded_bias = ops.fold(layer_weight, layer_bias, running_mean, running_var, weight, bias, eps, axis)
    return restore(folded_weight), restore(folded_bias)
