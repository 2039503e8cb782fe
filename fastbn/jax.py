"""JAX adapter: fastbn's CPU kernels as pure, differentiable JAX functions.

* :func:`batch_norm`: PyTorch's batch norm (:func:`fastbn.forward` and
  :func:`fastbn.backward`); new running statistics are returned, never
  updated in place;
* :func:`moments` and :func:`normalize`: TensorFlow's two steps
  (``tf.nn.moments`` / ``tf.nn.weighted_moments`` and
  ``tf.nn.batch_normalization``) over :func:`fastbn.moments` and
  :func:`fastbn.normalize`, differentiable in every input;
* :func:`merge_moments`: the exact merge of per-part statistics, for
  statistics synchronised over a mapped axis (as :mod:`fastbn.flax` does).

The kernels run through ``jax.pure_callback``, so the functions work on
concrete arrays and under ``jax.jit``, ``jax.grad`` and ``jax.vmap``; their
gradients are ``jax.custom_vjp`` rules whose reductions are fastbn's.  Each is
twice differentiable, exactly: the rule that calls :func:`fastbn.backward` is
itself a ``custom_vjp``, differentiated through a ``jax.numpy`` transcription
of the same formula, and the statistics it uses are outputs of the forward
rule (so they are differentiable too).  Reverse mode only (``jax.grad`` of
``jax.grad``, ``jax.jacrev``): ``custom_vjp`` functions have no ``jax.jvp``.

Importing this module imports jax; ``import fastbn`` alone never does.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, overload

from fastbn._frameworks import missing_dependency

try:
    import jax
except ModuleNotFoundError as exc:
    raise missing_dependency("fastbn.jax", "JAX", "jax", exc) from exc
import jax.numpy as jnp
import jax.typing
import numpy as np
from jax.custom_derivatives import SymbolicZero

import fastbn
from fastbn._fpenv import ieee_subnormals
from fastbn._jax_backward import _backward, _BackwardStatic, _host, _per_channel
from fastbn._jax_stats import (
    check_concrete_variance,
    check_static_eps,
    check_static_momentum,
    merge_moments,
    moments,
    normalize,
)
from fastbn._options import check_batch_eps, check_flag
from fastbn._validate import (
    check_axis,
    check_channel_vector,
    check_channels,
    check_running,
    check_x,
    stats_dtype,
)

__all__ = ["batch_norm", "merge_moments", "moments", "normalize"]


class _Static(NamedTuple):
    """The call's static (hashable, non-array) settings."""

    training: bool
    momentum: float
    eps: float
    axis: int  # non-negative
    count: int  # type: ignore[assignment]  # elements per channel (shadows tuple.count)
    has_running: bool
    has_bias: bool

    @property
    def batch_stats(self) -> bool:
        return self.training or not self.has_running

    @property
    def updates_running(self) -> bool:
        return self.training and self.has_running


@ieee_subnormals  # XLA calls back with subnormals flushed to zero (fastbn._fpenv)
def _forward_on_host(
    static: _Static, x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any
) -> tuple[Any, ...]:
    x, weight, bias = _host(x), _host(weight), _host(bias)
    if static.has_running:
        # fastbn updates running statistics in place and JAX buffers are
        # immutable: work on copies (C values each), returned as the new ones.
        running_mean, running_var = np.array(running_mean), np.array(running_var)
    y, saved = fastbn.forward(
        x,
        weight,
        bias,
        running_mean=running_mean,
        running_var=running_var,
        training=static.training,
        momentum=static.momentum,
        eps=static.eps,
        axis=static.axis,
    )
    running = (running_mean, running_var) if static.updates_running else ()
    return (y, saved.mean, saved.invstd, *running)


def _forward(
    static: _Static, x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any
) -> tuple[Any, Any, Any, tuple[Any, ...] | None]:
    """Run the forward callback; returns (y, mean, invstd, new running pair or None)."""
    stat = jax.ShapeDtypeStruct((x.shape[static.axis],), stats_dtype(x.dtype))
    shapes: tuple[jax.ShapeDtypeStruct, ...] = (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat)
    if static.updates_running:
        shapes += (stat, stat)
    # "sequential": under vmap each mapped slice is its own batch, which is
    # what batch norm of that slice means.
    outputs = jax.pure_callback(
        functools.partial(_forward_on_host, static),
        shapes,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        vmap_method="sequential",
    )
    y, mean, invstd = outputs[:3]
    if static.updates_running:
        running = tuple(outputs[3:])
    elif static.has_running:
        running = (running_mean, running_var)  # eval: unchanged
    else:
        running = None
    return y, mean, invstd, running


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm(
    static: _Static, x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any
) -> tuple[Any, Any, Any, tuple[Any, ...] | None]:
    # (y, mean, invstd, running): mean and invstd are outputs too, so that the
    # backward's residuals are differentiable functions of the inputs (second
    # derivatives); batch_norm returns only y and running.
    return _forward(static, x, weight, bias, running_mean, running_var)


def _batch_norm_fwd(
    static: _Static, x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any
) -> tuple[tuple[Any, Any, Any, tuple[Any, ...] | None], tuple[Any, Any, Any, Any]]:
    # symbolic_zeros=True: each array argument arrives as CustomVJPPrimal.
    x, weight, bias, running_mean, running_var = jax.tree_util.tree_map(
        lambda primal: primal.value, (x, weight, bias, running_mean, running_var)
    )
    # Calling _batch_norm itself (not _forward) keeps mean and invstd
    # differentiable when this rule is itself differentiated.
    outputs = _batch_norm(static, x, weight, bias, running_mean, running_var)
    _, mean, invstd, _ = outputs
    return outputs, (x, weight, mean, invstd)


def _is_zero(cotangent: Any) -> bool:
    return cotangent is None or isinstance(cotangent, SymbolicZero)


def _batch_norm_bwd(static: _Static, residuals: tuple[Any, ...], cotangents: tuple[Any, ...]) -> tuple[Any, ...]:
    x, weight, mean, invstd = residuals
    dy, ct_saved_mean, ct_invstd, running_cotangents = cotangents
    dtype = mean.dtype
    channels = mean.shape[0]
    m, n, axis = static.momentum, static.count, static.axis
    # Symbolic zeros let a gradient that involves only y (the usual case)
    # skip the other terms, and one of only those skip fastbn.
    if _is_zero(dy):
        dx = jnp.zeros(x.shape, x.dtype)
        dweight = dbias = jnp.zeros((channels,), dtype)
    else:
        dx, dweight, dbias = _backward(_BackwardStatic(static.batch_stats, axis, n), dy, x, weight, mean, invstd)
    # Terms of dx in the statistics dtype, from the statistics' own outputs
    # (the hidden mean and invstd, and the new running statistics).
    extra = None

    def add(term: Any) -> None:
        nonlocal extra
        extra = term if extra is None else extra + term

    d_mean_stat = None if _is_zero(ct_saved_mean) else ct_saved_mean
    # invstd = (var + eps)**-0.5: d invstd = -0.5 * invstd**3 d var.
    d_var_stat = None if _is_zero(ct_invstd) else -0.5 * invstd**3 * ct_invstd
    d_running_mean = d_running_var = None
    if static.has_running:
        ct_mean, ct_var = running_cotangents
        if static.training:
            # new = (1 - m) * old + m * batch, where batch is the mean and the
            # unbiased variance n / (n - 1) * mean((x - mean)**2) of x.
            if not _is_zero(ct_mean):
                d_running_mean = (1.0 - m) * ct_mean
                add(_per_channel(m / n * ct_mean, x.ndim, axis))
            if not _is_zero(ct_var):
                d_running_var = (1.0 - m) * ct_var
                add(_centered(x, mean, axis) * _per_channel(2.0 * m / (n - 1) * ct_var, x.ndim, axis))
        else:
            # Eval: y = (x - rm) * (rv + eps)**-0.5 * w + b and the new pair is
            # the old one, so with fastbn's dbias = sum(dy) and dweight =
            # sum((x - rm) * dy) * invstd the gradients are per-channel only.
            w = jnp.ones((channels,), dtype) if weight is None else weight
            d_running_mean = -w * invstd * dbias
            d_running_var = -0.5 * w * invstd * invstd * dweight
            if not _is_zero(ct_mean):
                d_running_mean = d_running_mean + ct_mean
            if not _is_zero(ct_var):
                d_running_var = d_running_var + ct_var
            # The hidden statistics are the running ones in eval.
            if d_mean_stat is not None:
                d_running_mean = d_running_mean + d_mean_stat
            if d_var_stat is not None:
                d_running_var = d_running_var + d_var_stat
            d_mean_stat = d_var_stat = None
    if static.batch_stats:
        # The batch mean and biased variance: d mean / dx_i = 1 / n and
        # d var / dx_i = 2 (x_i - mean) / n.
        if d_mean_stat is not None:
            add(_per_channel(d_mean_stat / n, x.ndim, axis))
        if d_var_stat is not None:
            add(_centered(x, mean, axis) * _per_channel(2.0 / n * d_var_stat, x.ndim, axis))
    if extra is not None:
        dx = (dx.astype(dtype) + extra).astype(x.dtype)
    return (
        dx,
        None if weight is None else dweight,
        dbias if static.has_bias else None,
        d_running_mean,
        d_running_var,
    )


def _centered(x: Any, mean: Any, axis: int) -> Any:
    return x.astype(mean.dtype) - _per_channel(mean, x.ndim, axis)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


@overload
def _as_jax(value: None) -> None: ...
@overload
def _as_jax(value: jax.typing.ArrayLike) -> jax.Array: ...
def _as_jax(value: jax.typing.ArrayLike | None) -> jax.Array | None:
    return None if value is None else jnp.asarray(value)


def batch_norm(
    x: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    bias: jax.typing.ArrayLike | None = None,
    *,
    running_mean: jax.typing.ArrayLike | None = None,
    running_var: jax.typing.ArrayLike | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Batch normalization with PyTorch's semantics, as a pure JAX function.

    Parameters
    ----------
    x : jax.Array or array_like
        Input of dtype float16, bfloat16, float32 or float64 (float64 needs
        ``jax_enable_x64``), rank >= 2.
    weight, bias : jax.Array, optional
        Per-channel scale and shift, shape ``(C,)``, float32 for
        float16/bfloat16/float32 input and float64 for float64.  Default 1
        and 0.
    running_mean, running_var : jax.Array, optional
        Running statistics (both or neither), same dtype.  Never modified:
        the updated ones are returned.
    training : bool, default True
        Normalise with the batch statistics (and return updated running ones)
        if True; with the running statistics if False and they are given;
        with the batch statistics if False and they are not.
    momentum : float, default 0.1
        In [0, 1]: ``new = (1 - momentum) * old + momentum * batch``, with the
        unbiased batch variance.  PyTorch's convention: Flax's ``momentum=0.9``
        is ``momentum=0.1`` here.
    eps : float, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis; ``-1`` for channels-last (NHWC) data.

    Returns
    -------
    y : jax.Array
        Same shape and dtype as ``x``.
    running : tuple of jax.Array or None
        ``(new_running_mean, new_running_var)``: updated in training, the
        given ones in eval; None when none were given.

    Raises
    ------
    TypeError, ValueError
        When tracing, before anything runs: for the same invalid arguments
        as :func:`fastbn.forward` (including a channel with one value in
        training), and for a non-bool ``training`` or a traced ``momentum``,
        ``eps`` or ``axis``, which must be Python values (or concrete NumPy
        or JAX scalars).  Checks of values rather than shapes (a negative
        ``running_var`` in eval) run here on concrete arrays; under
        ``jax.jit`` the values are known only inside the callback, so the
        same ValueError reaches the caller inside XLA's
        ``JaxRuntimeError``, when the call runs.

    Notes
    -----
    Runs on the CPU through ``jax.pure_callback`` (``vmap`` maps it
    sequentially).  ``jax.grad`` gives exact gradients with respect to every
    array argument: fastbn's for ``x``, ``weight`` and ``bias`` through ``y``,
    and the per-channel formulas through the running statistics (in eval,
    ``y`` depends on them; in training, the new ones depend on ``x``).
    Twice differentiable (Hessian-vector products, ``jax.jacrev`` of
    ``jax.grad``), in training and eval: the second derivative is that of
    the backward formula, transcribed in jax.numpy.  Reverse mode only
    (``jax.custom_vjp``): no ``jax.jvp``, hence no ``jax.hessian``
    (forward over reverse).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from fastbn.jax import batch_norm
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, (mean, var) = batch_norm(x, running_mean=jnp.zeros(3), running_var=jnp.ones(3))
    >>> grad = jax.grad(lambda x: batch_norm(x)[0][:, 0].sum())(x)
    >>> y.shape, grad.shape, [round(float(v), 3) for v in mean]
    ((4, 3), (4, 3), [0.45, 0.55, 0.65])
    """
    x, weight, bias = _as_jax(x), _as_jax(weight), _as_jax(bias)
    running_mean, running_var = _as_jax(running_mean), _as_jax(running_var)
    # Every check runs here, at trace time, on shapes and dtypes: an error
    # inside the callback would surface as an opaque runtime error.
    x = check_x(x)
    axis = check_axis(axis, x.ndim)
    training = check_flag(training, "training")
    momentum = check_static_momentum(momentum)
    eps = check_static_eps(eps, allow_zero=True)  # 0 only where the running statistics normalise (below)
    channels, count = check_channels(x, axis)
    dtype = stats_dtype(x.dtype)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_channel_vector(value, name, channels, dtype)
    has_running = check_running(running_mean, running_var, channels, dtype)
    if training or not has_running:
        check_batch_eps(eps, np.dtype(dtype))  # as fastbn.forward, at trace time: not in the callback
    if not training:  # eval normalises with running_var: known here unless traced
        check_concrete_variance(running_var, "running_var")
    if training and count == 1:
        raise ValueError(f"x: Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    static = _Static(training, momentum, eps, axis, count, has_running, bias is not None)
    y, _, _, running = _batch_norm(static, x, weight, bias, running_mean, running_var)
    return y, running
