"""fastbn.jax's TensorFlow-style functions: :func:`moments`, :func:`normalize` and :func:`merge_moments`.

Documented and exported by :mod:`fastbn.jax`; kept apart for its length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.typing
import numpy as np

import fastbn
from fastbn._fpenv import ieee_subnormals
from fastbn._jax_backward import _backward, _BackwardStatic, _host
from fastbn._options import check_eps, check_eps_range, check_momentum
from fastbn._validate import (
    check_axis,
    check_channels,
    check_variance,
    check_x,
    stats_dtype,
)

_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def _static_scalar(value: Any, name: str) -> Any:
    """A static option (eps, momentum) as given, or the Python number a concrete 0-d array holds.

    NumPy and JAX scalars are accepted where Flax accepts them.  A traced one
    cannot be: the value is fixed when the host call is traced.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name}: expected a Python float, got a traced value (it is fixed when the call is traced)")
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and value.dtype.kind in "fiu":
        return value.item()
    return value


def check_static_eps(eps: Any, *, allow_zero: bool = False) -> float:
    """``eps`` as a positive float (or 0 where ``allow_zero``), checked at trace time.

    A subnormal one is taken, as :func:`fastbn.forward` takes it: XLA calls
    back with subnormals flushed to zero, but fastbn's callbacks run with
    them kept (:mod:`fastbn._fpenv`).
    """
    value: float = check_eps(_static_scalar(eps, "eps"), allow_zero=allow_zero)
    return value


def check_static_momentum(momentum: Any) -> float:
    """``momentum`` as a float in [0, 1]; a concrete NumPy or JAX scalar is taken as its value."""
    return check_momentum(_static_scalar(momentum, "momentum"))


def biased_variance(unbiased: Any, x: Any, axes: tuple[int, ...], count: int) -> Any:
    """The biased batch variance from fastbn's unbiased one, ``var * (n - 1) / n`` (Flax's and Keras's statistic).

    Where the unbiased one overflowed the statistics dtype while the biased
    one, ``(n - 1) / n`` of it, need not (float32 data near 1.8e19 and a
    small n), it is computed again by :func:`moments` over ``axes``;
    ``lax.cond`` runs that only then (under ``vmap`` both branches run).
    """
    return jax.lax.cond(
        jnp.isinf(unbiased).any(),
        lambda: moments(x, axes=axes)[1].astype(unbiased.dtype),
        lambda: unbiased * ((count - 1) / count),
    )


def check_concrete_variance(value: Any, name: str) -> None:
    """Refuse negative variances where their values are known when called (outside ``jax.jit``).

    Under ``jit`` they are only known inside the host callback, where the
    same ValueError surfaces wrapped in XLA's runtime error.
    """
    if value is not None and not isinstance(value, jax.core.Tracer):
        check_variance(np.asarray(value), name)


def _check_float(value: Any, name: str) -> np.dtype[Any]:
    dtype: np.dtype[Any] = np.dtype(value.dtype)
    if dtype not in (np.float16, np.float32, np.float64) and dtype.name != "bfloat16":
        raise TypeError(f"{name}: expected dtype {_FLOAT_NAMES}, got {dtype}")
    return dtype


def _check_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    """The reduction axes as sorted non-negative ints (no duplicates), or a TypeError/ValueError naming ``axes``."""
    items = (axes,) if isinstance(axes, (int, np.integer)) and not isinstance(axes, (bool, np.bool_)) else axes
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"axes: expected an int or a sequence of ints, got {type(axes).__name__}") from None
    result = []
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"axes: expected an int or a sequence of ints, got an element {item!r}")
        if not -ndim <= item < ndim:
            raise ValueError(f"axes: {int(item)} is out of range for an array of {ndim} dimensions")
        result.append(int(item) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"axes: repeated axis in {tuple(int(i) for i in items)}")
    return tuple(sorted(result))


class _Flat(NamedTuple):
    """How x is seen as (A, K, B) with the kept axes as the one channel axis 1."""

    perm: tuple[int, ...] | None  # transpose first (kept axes not contiguous), or None
    shape3: tuple[int, int, int]
    kept: tuple[int, ...]  # the kept axes, in x
    kept_shape: tuple[int, ...]


def _flat(shape: tuple[int, ...], kept: tuple[int, ...]) -> _Flat:
    ndim = len(shape)
    kept_shape = tuple(shape[i] for i in kept)
    k = math.prod(kept_shape)
    if not kept:
        return _Flat(None, (math.prod(shape), 1, 1), kept, kept_shape)
    if kept == tuple(range(kept[0], kept[-1] + 1)):
        return _Flat(None, (math.prod(shape[: kept[0]]), k, math.prod(shape[kept[-1] + 1 :])), kept, kept_shape)
    reduced = tuple(i for i in range(ndim) if i not in kept)
    return _Flat(reduced + kept, (math.prod(shape[i] for i in reduced), k, 1), kept, kept_shape)


def _to3(value: Any, flat: _Flat) -> Any:
    if flat.perm is not None:
        value = jnp.transpose(value, flat.perm)
    return value.reshape(flat.shape3)


class _MomentsStatic(NamedTuple):
    count: int  # type: ignore[assignment]  # elements per channel (shadows tuple.count)
    weighted: bool


@ieee_subnormals  # XLA calls back with subnormals flushed to zero (fastbn._fpenv)
def _moments_on_host(static: _MomentsStatic, x: Any, w: Any) -> tuple[Any, Any]:
    x = _host(x)
    if not static.weighted:
        mean, var = fastbn.moments(x, axis=1)
        return mean, var
    w = _host(w)
    if not (np.all(np.isfinite(w)) and np.all(w >= 0)):
        # Traced weights could not be checked when tracing, and an exception
        # raised here would surface as an opaque runtime error: NaN instead.
        nan = np.full((x.shape[1],), np.nan, stats_dtype(x.dtype))
        return nan, nan.copy()
    mean, var = fastbn.moments(x, axis=1, weights=w)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moments(static: _MomentsStatic, x: Any, w: Any) -> tuple[Any, Any]:
    stat = jax.ShapeDtypeStruct((x.shape[1],), stats_dtype(x.dtype))
    mean, var = jax.pure_callback(
        functools.partial(_moments_on_host, static), (stat, stat), x, w, vmap_method="sequential"
    )
    return mean, var


def _moments_fwd(static: _MomentsStatic, x: Any, w: Any) -> tuple[tuple[Any, Any], tuple[Any, ...]]:
    mean, var = _moments(static, x, w)  # itself: differentiable residuals
    return (mean, var), (x, w, mean, var)


def _moments_bwd(static: _MomentsStatic, residuals: tuple[Any, ...], cotangents: tuple[Any, Any]) -> tuple[Any, Any]:
    # Elementwise: dmean/dx_i = w_i / W, dvar/dx_i = 2 w_i (x_i - mean) / W,
    # dmean/dw_i = (x_i - mean) / W, dvar/dw_i = ((x_i - mean)**2 - var) / W.
    x, w, mean, var = residuals
    ct_mean, ct_var = (c[None, :, None] for c in cotangents)
    centered = x.astype(mean.dtype) - mean[None, :, None]
    if not static.weighted:
        dx = (ct_mean + 2.0 * ct_var * centered) / static.count
        return dx.astype(x.dtype), None
    total = jnp.sum(w, axis=(0, 2))
    inverse = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)[None, :, None]
    dx = w * inverse * (ct_mean + 2.0 * ct_var * centered)
    dw = inverse * (ct_mean * centered + ct_var * (centered * centered - var[None, :, None]))
    return dx.astype(x.dtype), dw


_moments.defvjp(_moments_fwd, _moments_bwd)


def moments(
    x: jax.typing.ArrayLike,
    axis: int | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    keepdims: bool = False,
    weights: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of ``x`` (``tf.nn.moments`` / ``tf.nn.weighted_moments``), differentiable.

    The JAX form of :func:`fastbn.moments`: fastbn's kernels compute the
    statistics (through ``jax.pure_callback``), and ``jax.grad`` gives their
    exact gradients (a ``jax.custom_vjp``), twice differentiable.

    Parameters
    ----------
    x : jax.Array or array_like
        float16, bfloat16, float32 or float64 (float64 needs ``jax_enable_x64``).
    axis : int, optional
        The channel axis (PyTorch's form; default 1 when ``axes`` is not
        given): statistics per channel over every other axis.  Needs rank >= 2.
    axes : int or sequence of int, optional
        The reduction axes instead (TensorFlow's form); every other axis is
        kept.  Give ``axis`` or ``axes``, not both.
    keepdims : bool, default False
        Return arrays of ``x``'s rank with the reduced axes of size 1;
        otherwise of the kept axes' shape.
    weights : jax.Array or array_like, optional
        Non-negative frequency weights broadcastable to ``x``: the weighted
        mean ``sum(w x) / sum(w)`` and variance ``sum(w (x - mean)**2) /
        sum(w)``; 0 and 0 where ``sum(w) == 0``.  Differentiable too.
    mask : jax.Array or array_like of bool, optional
        Statistics over the True positions only (``weights = mask``):
        broadcastable to ``x``, or (with ``axis``) of ``x``'s shape without
        the channel axis, as Keras's mask for ``(N, T, C)`` input is
        ``(N, T)``.  Not with ``weights``.

    Returns
    -------
    mean, var : jax.Array
        float32 for float16/bfloat16/float32 input, float64 for float64.  An
        empty reduction gives NaN (NumPy's and TensorFlow's answer).

    Raises
    ------
    TypeError, ValueError
        At trace time, naming the argument: a non-float ``x``, an axis out of
        range, both or neither of ``axis``/``axes`` resolvable, weights or a
        mask that do not broadcast.  Traced weights cannot be checked for
        sign: negative or non-finite ones give NaN statistics (for every
        channel), not an error.

    Notes
    -----
    The gradient is elementwise (``dmean/dx_i = w_i / W``, ``dvar/dx_i =
    2 w_i (x_i - mean) / W``, and for the weights ``(x_i - mean) / W`` and
    ``((x_i - mean)**2 - var) / W``); reverse mode only.  The kept axes are
    flattened into one channel axis first (a reshape, or a transpose where
    they are not adjacent), so fastbn's per-channel kernels do the reductions.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fastbn.jax import moments
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> [v.tolist() for v in moments(x, axes=0)]
    [[3.0, 4.0], [5.0, 5.0]]
    """
    x = jnp.asarray(x)
    dtype = _check_float(x, "x")
    ndim = x.ndim
    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"keepdims: expected True or False, got {type(keepdims).__name__}")
    if axis is not None and axes is not None:
        raise ValueError("axis, axes: give the channel axis (axis) or the reduction axes (axes), not both")
    channel_axis = None
    if axes is None:
        check_x(x)
        channel_axis = check_axis(1 if axis is None else axis, ndim)
        reduce = tuple(i for i in range(ndim) if i != channel_axis)
    else:
        reduce = _check_axes(axes, ndim)
    kept = tuple(i for i in range(ndim) if i not in reduce)
    if channel_axis is None and len(kept) == 1:
        channel_axis = kept[0]  # one kept axis is a channel axis, as fastbn.moments takes it (the mask's form)
    sdtype = stats_dtype(dtype)
    if weights is not None and mask is not None:
        raise ValueError("weights, mask: give one of the two (a mask is weights of 0 and 1)")
    w = None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask: expected a bool array, got dtype {mask.dtype}")
        if channel_axis is not None and mask.ndim == ndim - 1 and ndim > 1:
            without = tuple(n for i, n in enumerate(x.shape) if i != channel_axis)
            if tuple(mask.shape) == without:
                mask = jnp.expand_dims(mask, channel_axis)
        w = _broadcast(mask, x.shape, "mask").astype(sdtype)
    elif weights is not None:
        weights = jnp.asarray(weights)
        if not (jnp.issubdtype(weights.dtype, jnp.floating) or jnp.issubdtype(weights.dtype, jnp.integer)):
            raise TypeError(f"weights: expected a real (float or integer) array, got dtype {weights.dtype}")
        w = _broadcast(weights, x.shape, "weights").astype(sdtype)
    flat = _flat(tuple(x.shape), kept)
    count = flat.shape3[0] * flat.shape3[2]
    if flat.shape3[1] == 0 or count == 0:
        # Nothing to reduce (an empty batch: NaN) or no channels: no kernel.
        fill = np.nan if count == 0 else 0.0
        mean = var = jnp.full(flat.kept_shape, fill, sdtype)
    else:
        x3 = _to3(x, flat)
        w3 = None if w is None else _to3(w, flat)
        mean, var = _moments(_MomentsStatic(count, w3 is not None), x3, w3)
        mean, var = mean.reshape(flat.kept_shape), var.reshape(flat.kept_shape)
    if keepdims:
        full = tuple(x.shape[i] if i in kept else 1 for i in range(ndim))
        mean, var = mean.reshape(full), var.reshape(full)
    return mean, var


def _broadcast(value: Any, shape: tuple[int, ...], name: str) -> Any:
    try:
        np.broadcast_shapes(tuple(value.shape), shape)
        if np.broadcast_shapes(tuple(value.shape), shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not broadcast to x's shape {shape}") from None
    return jnp.broadcast_to(value, shape)


class _NormalizeStatic(NamedTuple):
    eps: float
    axis: int
    count: int  # type: ignore[assignment]  # elements per channel (shadows tuple.count)


@ieee_subnormals  # XLA calls back with subnormals flushed to zero (fastbn._fpenv)
def _normalize_on_host(static: _NormalizeStatic, x: Any, mean: Any, var: Any, weight: Any, bias: Any) -> Any:
    x = _host(x)
    return fastbn.normalize(x, _host(mean), _host(var), _host(weight), _host(bias), eps=static.eps, axis=static.axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize(static: _NormalizeStatic, x: Any, mean: Any, var: Any, weight: Any, bias: Any) -> Any:
    return jax.pure_callback(
        functools.partial(_normalize_on_host, static),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        x,
        mean,
        var,
        weight,
        bias,
        vmap_method="sequential",
    )


def _normalize_fwd(
    static: _NormalizeStatic, x: Any, mean: Any, var: Any, weight: Any, bias: Any
) -> tuple[Any, tuple[Any, ...]]:
    invstd = jax.lax.rsqrt(var + jnp.asarray(static.eps, var.dtype))  # jnp: differentiable in var
    return _normalize(static, x, mean, var, weight, bias), (x, mean, weight, invstd, bias is not None)


def _normalize_bwd(static: _NormalizeStatic, residuals: tuple[Any, ...], dy: Any) -> tuple[Any, ...]:
    x, mean, weight, invstd, has_bias = residuals
    # fastbn's eval-mode backward: dx = dy * invstd * w, and the two
    # per-channel sums sum(dy) and sum(dy * (x - mean)) * invstd.
    dx, dweight, dbias = _backward(_BackwardStatic(False, static.axis, static.count), dy, x, weight, mean, invstd)
    w = 1.0 if weight is None else weight
    dmean = -w * invstd * dbias
    dvar = -0.5 * w * invstd * invstd * dweight
    return dx, dmean, dvar, None if weight is None else dweight, dbias if has_bias else None


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _channel_axis_of(params: Sequence[tuple[str, Any]], ndim: int) -> int:
    """axis=None: the one axis along which the broadcastable (rank >= 2) parameters vary; else 1."""
    varying: set[int] = set()
    for _, value in params:
        if value.ndim >= 2:
            offset = ndim - value.ndim
            varying.update(offset + i for i, n in enumerate(value.shape) if n != 1)
    if len(varying) > 1:
        names = ", ".join(name for name, _ in params)
        raise ValueError(
            f"{names}: vary along axes {tuple(sorted(varying))} of x; normalize takes statistics of one channel "
            "axis (flatten several feature axes into one first)"
        )
    return varying.pop() if varying else 1


def _as_channel_vector(value: Any, name: str, x_shape: tuple[int, ...], axis: int, dtype: Any) -> Any:
    channels, ndim = x_shape[axis], len(x_shape)
    if not (jnp.issubdtype(value.dtype, jnp.floating)):
        raise TypeError(f"{name}: expected a float array, got dtype {value.dtype}")
    shape = tuple(value.shape)
    if value.ndim <= 1:
        if value.size not in (1, channels):
            raise ValueError(f"{name}: expected shape ({channels},), got {shape}")
    else:
        padded = (1,) * (ndim - value.ndim) + shape
        if value.ndim > ndim or any(n != 1 for i, n in enumerate(padded) if i != axis):
            raise ValueError(
                f"{name}: expected shape ({channels},) or a shape broadcastable to x {x_shape} that varies only "
                f"along the channel axis {axis}, got {shape}"
            )
        if padded[axis] not in (1, channels):
            raise ValueError(f"{name}: has {padded[axis]} values along the channel axis {axis}, x has {channels}")
    return jnp.broadcast_to(value.reshape(-1), (channels,)).astype(dtype)


def normalize(
    x: jax.typing.ArrayLike,
    mean: jax.typing.ArrayLike,
    var: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int | None = None,
) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` (``tf.nn.batch_normalization``), differentiable.

    The JAX form of :func:`fastbn.normalize`: fastbn's kernel normalises
    (through ``jax.pure_callback``) and its eval-mode backward gives the
    gradients with respect to all five inputs (a ``jax.custom_vjp``, twice
    differentiable).

    Parameters
    ----------
    x : jax.Array or array_like
        float16, bfloat16, float32 or float64, rank >= 2.
    mean, var : jax.Array or array_like
        Per-channel statistics: shape ``(C,)`` (or a single value), or any
        shape broadcastable to ``x`` that varies only along the channel axis,
        such as ``(1, 1, 1, C)`` or the keepdims output of :func:`moments`;
        any float dtype (cast to the statistics dtype).
    weight, bias : jax.Array or array_like, optional
        Scale and shift, shaped like ``mean``; default 1 and 0.
    eps : float, default 1e-5
        Positive, added to ``var``.
    axis : int, optional
        The channel axis.  Default: the axis along which parameters of rank
        >= 2 vary (right-aligned, as broadcasting aligns them), or 1 when
        all are ``(C,)``.

    Returns
    -------
    jax.Array
        Same shape and dtype as ``x``.  Each parameter's gradient has the
        parameter's own shape and dtype.

    Raises
    ------
    TypeError, ValueError
        When called, naming the argument; a negative ``var`` too, where it
        is concrete.  A negative traced ``var`` (under ``jax.jit``) is refused
        only by the kernel, at run time: the ValueError then reaches the
        caller inside XLA's ``JaxRuntimeError``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fastbn.jax import moments, normalize
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> mean, var = moments(x, axes=0, keepdims=True)
    >>> [round(v, 3) for v in normalize(x, mean, var)[:, 1].tolist()]
    [-1.342, -0.447, 0.447, 1.342]
    """
    x = check_x(jnp.asarray(x))
    _check_float(x, "x")
    eps = check_static_eps(eps)
    check_concrete_variance(var, "var")
    given = [("mean", jnp.asarray(mean)), ("var", jnp.asarray(var))]
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            given.append((name, jnp.asarray(value)))
    axis = _channel_axis_of(given, x.ndim) if axis is None else check_axis(axis, x.ndim)
    _, count = check_channels(x, axis)
    dtype = stats_dtype(x.dtype)
    check_eps_range(eps, np.dtype(dtype))  # as fastbn.normalize, at trace time: not in the callback
    vectors = {name: _as_channel_vector(value, name, tuple(x.shape), axis, dtype) for name, value in given}
    static = _NormalizeStatic(eps, axis, count)
    y: jax.Array = _normalize(static, x, vectors["mean"], vectors["var"], vectors.get("weight"), vectors.get("bias"))
    return y


def merge_moments(
    counts: jax.typing.ArrayLike, means: jax.typing.ArrayLike, variances: jax.typing.ArrayLike, axis: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merge per-part (count, mean, biased variance) summaries into the whole's, exactly.

    Chan's parallel formula in variance form, for all parts at once: with
    ``N = sum(n_i)``, ``mean = sum(n_i mean_i) / N`` and ``var = (sum(n_i
    var_i) + sum(n_i (mean_i - mean)**2)) / N``.  Exact for parts of unequal
    size (an equal-weight average of the parts' means is not), and never
    forms ``E[x^2] - E[x]^2``.  Pure jax.numpy: differentiable, usable after
    ``jax.lax.all_gather``.

    Parameters
    ----------
    counts : jax.Array
        Elements in each part: shape ``(P,)`` along ``axis`` (broadcast
        against the statistics), any real dtype.
    means, variances : jax.Array
        Each part's mean and biased variance, stacked along ``axis``.
    axis : int, default 0
        The parts' axis.

    Returns
    -------
    count, mean, var : jax.Array
        The total count and the whole's mean and biased variance (``axis``
        removed).  Where the total count is 0, mean and var are NaN (an
        empty batch); a part of count 0 contributes nothing, even with NaN
        statistics.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fastbn.jax import merge_moments, moments
    >>> a, b = jnp.arange(2.0).reshape(2, 1), jnp.arange(2.0, 8.0).reshape(6, 1)
    >>> (ma, va), (mb, vb) = moments(a, axes=0), moments(b, axes=0)
    >>> count, mean, var = merge_moments(jnp.array([2, 6]), jnp.stack([ma, mb]), jnp.stack([va, vb]))
    >>> [round(float(v), 4) for v in (count[0], mean[0], var[0])]
    [8.0, 3.5, 5.25]
    """
    m = jnp.asarray(means)
    v = jnp.asarray(variances)
    if m.shape != v.shape:
        raise ValueError(f"variances: expected the shape of means {m.shape}, got {v.shape}")
    axis = check_axis(axis, max(m.ndim, 1))
    n = jnp.asarray(counts).astype(m.dtype)
    if n.ndim == 1 and m.ndim > 1:
        shape = [1] * m.ndim
        shape[axis] = -1
        n = n.reshape(shape)
    # A part with no elements (NaN statistics) contributes nothing.
    m = jnp.where(n > 0, m, 0)
    v = jnp.where(n > 0, v, 0)
    total = jnp.sum(n, axis=axis, keepdims=True)
    mean = jnp.sum(n * m, axis=axis, keepdims=True) / total
    spread = jnp.sum(n * v, axis=axis, keepdims=True)
    between = jnp.sum(n * (m - mean) ** 2, axis=axis, keepdims=True)
    var = (spread + between) / total
    return jnp.squeeze(total, axis), jnp.squeeze(mean, axis), jnp.squeeze(var, axis)
