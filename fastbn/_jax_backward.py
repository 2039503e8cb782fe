"""The backward rule shared by :mod:`fastbn.jax`'s functions: fastbn.backward as a twice-differentiable JAX function.

Kept apart from :mod:`fastbn.jax` (which imports jax for the user, naming the
extra if it is missing) for its length.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.typing
import numpy as np

import fastbn
from fastbn._fpenv import ieee_subnormals


def _host(array: Any) -> Any:
    # Callbacks receive jax arrays; fastbn then reads read-only views of their
    # host buffers and returns NumPy, which JAX copies into its own buffers.
    return None if array is None else np.asarray(array)


class _BackwardStatic(NamedTuple):
    """Static settings of fastbn.backward for one call: the formula and the input's geometry."""

    batch_stats: bool
    axis: int
    count: int  # type: ignore[assignment]  # elements per channel (shadows tuple.count)


@ieee_subnormals  # XLA calls back with subnormals flushed to zero (fastbn._fpenv)
def _backward_on_host(static: _BackwardStatic, dy: Any, x: Any, weight: Any, mean: Any, invstd: Any) -> tuple[Any, ...]:
    dy, x, weight = _host(dy), _host(x), _host(weight)
    saved = fastbn.Saved(_host(mean), _host(invstd), static.batch_stats, static.count, x.shape, static.axis)
    result: tuple[Any, ...] = fastbn.backward(dy, x, weight, saved, axis=static.axis)
    return result


def _per_channel(values: Any, ndim: int, axis: int) -> Any:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _backward_formula(
    static: _BackwardStatic, dy: Any, x: Any, weight: Any, mean: Any, invstd: Any
) -> tuple[Any, Any, Any]:
    """fastbn.backward's formula in jax.numpy: only differentiated (second derivatives), never run for values."""
    dtype = mean.dtype
    axis, ndim = static.axis, x.ndim
    reduce = tuple(i for i in range(ndim) if i != axis)
    s = _per_channel(invstd, ndim, axis)
    dys = dy.astype(dtype)
    xhat = (x.astype(dtype) - _per_channel(mean, ndim, axis)) * s
    dbias = jnp.sum(dys, axis=reduce)
    dweight = jnp.sum(dys * xhat, axis=reduce)
    scale = s if weight is None else s * _per_channel(weight, ndim, axis)
    if static.batch_stats:
        n = static.count
        dx = scale * (dys - _per_channel(dbias / n, ndim, axis) - xhat * _per_channel(dweight / n, ndim, axis))
    else:
        dx = scale * dys
    return dx.astype(x.dtype), dweight, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _backward(static: _BackwardStatic, dy: Any, x: Any, weight: Any, mean: Any, invstd: Any) -> tuple[Any, Any, Any]:
    """(dx, dweight, dbias) from fastbn.backward; differentiable through the jax.numpy formula above."""
    channels = mean.shape[0]
    stat = jax.ShapeDtypeStruct((channels,), mean.dtype)
    dx, dweight, dbias = jax.pure_callback(
        functools.partial(_backward_on_host, static),
        (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat),
        dy,
        x,
        weight,
        mean,
        invstd,
        vmap_method="sequential",
    )
    return dx, dweight, dbias


def _backward_fwd(
    static: _BackwardStatic, dy: Any, x: Any, weight: Any, mean: Any, invstd: Any
) -> tuple[tuple[Any, Any, Any], tuple[Any, ...]]:
    return _backward(static, dy, x, weight, mean, invstd), (dy, x, weight, mean, invstd)


def _backward_bwd(static: _BackwardStatic, residuals: tuple[Any, ...], cotangents: Any) -> tuple[Any, ...]:
    dy, x, weight, mean, invstd = residuals
    if weight is None:
        _, vjp = jax.vjp(lambda d, u, m, s: _backward_formula(static, d, u, None, m, s), dy, x, mean, invstd)
        ddy, dx, dmean, dinvstd = vjp(cotangents)
        return ddy, dx, None, dmean, dinvstd
    _, vjp = jax.vjp(functools.partial(_backward_formula, static), dy, x, weight, mean, invstd)
    return tuple(vjp(cotangents))


_backward.defvjp(_backward_fwd, _backward_bwd)
