"""``fastbn.torch.moments`` and ``fastbn.torch.normalize``: TF-style statistics as differentiable custom operators.

:func:`moments` is ``tf.nn.moments`` / ``tf.nn.weighted_moments`` (and the
masked statistics of Keras and Flax) on torch tensors; :func:`normalize` is
``tf.nn.batch_normalization``.  Both run fastbn's kernels through
:func:`fastbn.moments` and :func:`fastbn.normalize`, registered as custom
operators, as :mod:`fastbn.torch._ops` registers batch norm:

* ``torch.ops.fastbn.moments(input, axes, keepdim, weights, mask) -> (mean, var)``,
  differentiable in ``input`` and ``weights`` by torch formulas (the
  derivatives are elementwise; nothing is left to reduce over the input but
  the total weight), differentiable again (double backward);
* ``torch.ops.fastbn.normalize(input, mean, var, weight, bias, eps, dim)``,
  with ``(C,)`` statistics-dtype parameters, differentiable in all five
  tensors through ``torch.ops.fastbn.normalize_backward``, whose per-channel
  reductions (``sum(dy)`` and ``sum(dy * (x - mean)) * invstd``) are fastbn's
  eval-mode batch-norm backward kernel, and which is differentiable again by
  torch formulas.

Each has a fake implementation, so torch.compile (``fullgraph=True``),
``torch.export`` and ``torch.library.opcheck`` see shapes, dtypes and
strides without running anything, and Dynamo never traces into Numba.
Under ``torch.func`` transforms the same operators and derivatives run
through ``autograd.Function`` twins: ``grad``, ``vjp``, ``jacrev`` (nested
too) and ``vmap`` (one operator call per vmapped item, not one fused call);
forward mode (``jvp``, ``jacfwd``, ``hessian``) is not implemented.  The
public functions check their arguments first (shapes, dtypes and devices
only, so the checks hold under tracing too), then map the torch-flavoured
arguments onto the operators; broadcast parameter shapes and dtypes are
mapped with differentiable torch views and casts, so each parameter's
gradient comes back in its own shape and dtype.

CPU tensors reach fastbn as NumPy views of their memory (no copy; outputs
keep the input's strides).  CUDA tensors go through the same registrations
to fastbn's CUDA backend, where :func:`fastbn.moments` takes one kept
dimension and no weights or mask; that path is not exercised by this
package's tests, which run on the CPU.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

import fastbn
from fastbn.torch import _ops
from fastbn.torch._checks import FLOATS, BatchNormError, BatchNormTypeError
from fastbn.torch._functional import TorchErrors
from fastbn.torch._stats_checks import (
    _as_channel_vector,
    _channel_dim,
    _check_input,
    _check_tensor,
    _moments_weights,
    _reduction_axes,
)

Tensor = torch.Tensor

__all__ = ["moments", "moments_op", "normalize", "normalize_backward_op", "normalize_op"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for float16, bfloat16 and float32 (fastbn's statistics dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape_after(shape: Sequence[int], axes: Sequence[int], keepdim: bool) -> tuple[int, ...]:
    """The shape of a reduction over ``axes`` of ``shape``: the kept axes, or all with the reduced ones 1."""
    if keepdim:
        return tuple(1 if axis in axes else size for axis, size in enumerate(shape))
    return tuple(size for axis, size in enumerate(shape) if axis not in axes)


def _like(result: Tensor, input: Tensor) -> Tensor:
    """``result`` (input's shape) with the strides ``torch.empty_like(input)`` has, as the fake kernels promise.

    fastbn writes its outputs in the input's memory order for contiguous and
    channels-last layouts (no copy then) and C-contiguous for other views;
    only those get copied into a tensor of ``empty_like``'s strides.
    """
    expected = torch.empty_like(input, device="meta").stride()
    if result.stride() == expected:
        return result
    out = torch.empty_like(input)
    out.copy_(result)
    return out


def _along(vector: Tensor, ndim: int, dim: int) -> Tensor:
    """A ``(C,)`` vector shaped to broadcast along ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return vector.reshape(shape)


# ------------------------------------------------------------------ moments ---
@torch.library.custom_op("fastbn::moments", mutates_args=())
def moments_op(
    input: Tensor, axes: list[int], keepdim: bool, weights: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``input`` over ``axes`` (non-negative, sorted), by :func:`fastbn.moments`.

    ``weights`` and ``mask`` broadcast to ``input``'s shape (at most one is
    given).  Results are in the statistics dtype, of the kept axes' shape (or
    ``input``'s rank with the reduced axes 1, with ``keepdim``); NaN where
    nothing is reduced (an empty batch).
    """
    dtype = _stats_dtype(input.dtype)
    shape = _shape_after(input.shape, axes, keepdim)
    if input.numel() == 0:
        nan = input.new_full(shape, math.nan, dtype=dtype)
        return nan, nan.clone()
    if weights is not None and weights.dtype == torch.bfloat16:
        weights = weights.float()  # fastbn.moments reads weights as NumPy numbers, which bfloat16 is not
    with TorchErrors():
        mean, var = fastbn.moments(input, axes=tuple(axes), keepdims=keepdim, weights=weights, mask=mask)
    mean, var = _ops._as_tensor(mean, input), _ops._as_tensor(var, input)
    return mean.reshape(shape), var.reshape(shape)


@moments_op.register_fake
def _moments_fake(
    input: Tensor, axes: list[int], keepdim: bool, weights: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    dtype = _stats_dtype(input.dtype)
    shape = _shape_after(input.shape, axes, keepdim)
    return input.new_empty(shape, dtype=dtype), input.new_empty(shape, dtype=dtype)


def _total_weight(w: Tensor, shape: Sequence[int], axes: Sequence[int]) -> Tensor:
    """``sum(w)`` over ``axes`` of ``w`` broadcast to ``shape``, kept dimensions, without broadcasting ``w``.

    Axes along which ``w`` has size 1 (or that it lacks) count by their size.
    """
    pad = len(shape) - w.dim()
    summed = [axis - pad for axis in axes if axis >= pad and w.shape[axis - pad] != 1]
    factor = math.prod(shape[axis] for axis in axes if axis < pad or w.shape[axis - pad] == 1)
    total = w.sum(dim=summed, keepdim=True) if summed else w
    return total * factor


def _moments_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    input, axes, _keepdim, weights, mask = inputs
    mean, var = output
    ctx.save_for_backward(input, weights, mask, mean, var)
    ctx.axes = tuple(axes)


def _moments_backward(ctx: Any, grad_mean: Tensor | None, grad_var: Tensor | None) -> tuple[Any, ...]:
    """Gradients of ``(mean, var)`` in ``input`` and ``weights``, as torch expressions (so twice differentiable).

    With weights ``w`` and ``W = sum(w)`` over the reduced axes:
    ``dmean/dx_i = w_i / W``, ``dvar/dx_i = 2 w_i (x_i - mean) / W``,
    ``dmean/dw_i = (x_i - mean) / W``, ``dvar/dw_i = ((x_i - mean)^2 - var) / W``;
    zero where ``W`` is 0 (there mean and var are the constant 0).
    """
    input, weights, mask, mean, var = ctx.saved_tensors
    axes = ctx.axes
    need_input, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if input.numel() == 0:
        grad_weights = torch.zeros_like(weights) if need_weights and weights is not None else None
        return torch.zeros_like(input) if need_input else None, None, None, grad_weights, None
    dtype = mean.dtype
    shape = _shape_after(input.shape, axes, True)  # broadcastable against input
    mean, var = mean.reshape(shape), var.reshape(shape)
    g_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.reshape(shape)
    g_var = torch.zeros_like(var) if grad_var is None else grad_var.reshape(shape)
    centred = input.to(dtype) - mean
    if weights is None and mask is None:
        count = math.prod(input.shape[axis] for axis in axes)
        grad_input = (g_mean + 2 * g_var * centred) / count
        return grad_input.to(input.dtype) if need_input else None, None, None, None, None
    w = (weights if weights is not None else mask).to(dtype)
    total = _total_weight(w, input.shape, axes)
    scale = torch.where(total > 0, 1 / torch.where(total > 0, total, 1), 0)
    grad_input = grad_weights = None
    if need_input:
        grad_input = (w * scale * (g_mean + 2 * g_var * centred)).to(input.dtype)
    if need_weights and weights is not None:
        full = scale * (centred * g_mean + g_var * (centred * centred - var))
        grad_weights = full.sum_to_size(weights.shape).to(weights.dtype)
    return grad_input, None, None, grad_weights, None


moments_op.register_autograd(_moments_backward, setup_context=_moments_setup)


# ---------------------------------------------------------------- normalize ---
@torch.library.custom_op("fastbn::normalize", mutates_args=())
def normalize_op(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dim: int
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` along ``dim``, by :func:`fastbn.normalize`.

    ``mean``, ``var``, ``weight`` and ``bias`` are ``(C,)`` in the
    statistics dtype; the output has input's shape, dtype and strides.
    """
    if input.numel() == 0:
        return torch.empty_like(input)
    with TorchErrors():
        y = fastbn.normalize(input, mean, var, weight, bias, eps=eps, axis=dim)
    return _like(_ops._as_tensor(y, input), input)


@normalize_op.register_fake
def _normalize_fake(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dim: int
) -> Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("fastbn::normalize_backward", mutates_args=())
def normalize_backward_op(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_out * weight * invstd, sum(grad_out * (input - mean)) * invstd, sum(grad_out))`` along ``dim``.

    fastbn's eval-mode batch-norm backward (:func:`fastbn.backward` with
    constant statistics ``mean`` and ``invstd``): the input gradient of
    normalize and the two per-channel sums from which the gradients of
    ``mean``, ``var``, ``weight`` and ``bias`` follow.
    """
    channels = input.shape[dim]
    if input.numel() == 0:
        zeros = input.new_zeros(channels, dtype=mean.dtype)
        return torch.empty_like(input), zeros, zeros.clone()
    saved = fastbn.Saved(
        mean=_ops._host_or_device(mean),
        invstd=_ops._host_or_device(invstd),
        batch_stats=False,
        count=input.numel() // channels,
        shape=tuple(input.shape),
        axis=dim,
    )
    with TorchErrors():
        grad_input, grad_weight, grad_bias = fastbn.backward(grad_out, input, weight, saved, axis=dim)
    return (
        _like(_ops._as_tensor(grad_input, input), input),
        _ops._as_tensor(grad_weight, input),
        _ops._as_tensor(grad_bias, input),
    )


@normalize_backward_op.register_fake
def _normalize_backward_fake(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    channels = input.shape[dim]
    return (
        torch.empty_like(input),
        input.new_empty(channels, dtype=mean.dtype),
        input.new_empty(channels, dtype=mean.dtype),
    )


def _normalize_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, mean, var, weight, _bias, eps, dim = inputs
    ctx.save_for_backward(input, mean, var, weight)
    ctx.eps, ctx.dim = eps, dim


def _normalize_backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
    """Gradients of normalize in ``(input, mean, var, weight, bias)``, from fastbn's per-channel sums.

    With ``s = 1 / sqrt(var + eps)``, ``g = weight`` (or 1), ``dg = sum(dy (x - mean)) s``
    and ``db = sum(dy)``: ``dx = dy g s``, ``dmean = -db g s``,
    ``dvar = -dg g s^2 / 2``.  ``s`` is computed from ``var`` with torch, so
    that a double backward reaches ``var`` through it.
    """
    input, mean, var, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    invstd = torch.rsqrt(var + ctx.eps)
    args = (grad_out, input, mean, invstd, weight)
    if torch.compiler.is_compiling() or _ops.plain(*args):
        grad_input, grad_weight, grad_bias = normalize_backward_op(*args, ctx.dim)
    else:  # under torch.func transforms (grad of grad)
        grad_input, grad_weight, grad_bias = _NormalizeBackwardFunction.apply(*args, ctx.dim)  # type: ignore[no-untyped-call]
    scale = invstd if weight is None else weight * invstd
    return (
        grad_input if need[0] else None,
        -grad_bias * scale if need[1] else None,
        -0.5 * grad_weight * scale * invstd if need[2] else None,
        grad_weight if need[3] else None,
        grad_bias if need[4] else None,
        None,
        None,
    )


def _normalize_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    grad_out, input, mean, invstd, weight, dim = inputs
    ctx.save_for_backward(grad_out, input, mean, invstd, weight, output[2])
    ctx.dim = dim


def _normalize_double_backward(
    ctx: Any, g_grad_input: Tensor | None, g_grad_weight: Tensor | None, g_grad_bias: Tensor | None
) -> tuple[Any, ...]:
    """The vector-Jacobian product of :func:`normalize_backward_op`, in torch (itself differentiable).

    Of ``dx = dy g s``, ``dg = sum(dy (x - m)) s`` and ``db = sum(dy)``,
    with cotangents ``(u, a, b)``: ``d(dy) = u g s + a (x - m) s + b``,
    ``d(x) = a s dy``, ``d(m) = -a s db``,
    ``d(s) = sum(u dy) g + a sum(dy (x - m))``, ``d(g) = sum(u dy) s``.
    """
    grad_out, input, mean, invstd, weight, grad_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dim, ndim = ctx.dim, input.dim()
    dtype = mean.dtype
    reduce = [axis for axis in range(ndim) if axis != dim]
    dy = grad_out.to(dtype)
    centred = input.to(dtype) - _along(mean, ndim, dim)
    s = _along(invstd, ndim, dim)
    zeros = torch.zeros_like(mean)
    u = None if g_grad_input is None else g_grad_input.to(dtype)
    a = zeros if g_grad_weight is None else g_grad_weight
    b = zeros if g_grad_bias is None else g_grad_bias
    g = None if weight is None else _along(weight, ndim, dim)
    grad_dy = _along(a, ndim, dim) * centred * s + _along(b, ndim, dim)
    if u is not None:
        grad_dy = grad_dy + u * (s if g is None else g * s)
    grad_x = _along(a, ndim, dim) * s * dy
    grad_mean = -a * invstd * grad_bias
    u_dy = zeros if u is None else (u * dy).sum(dim=reduce)
    grad_invstd = u_dy * (1 if weight is None else weight) + a * (dy * centred).sum(dim=reduce)
    grad_weight = u_dy * invstd if weight is not None else None
    return (
        grad_dy.to(grad_out.dtype) if need[0] else None,
        grad_x.to(input.dtype) if need[1] else None,
        grad_mean if need[2] else None,
        grad_invstd if need[3] else None,
        grad_weight if need[4] else None,
        None,
    )


normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup)
normalize_backward_op.register_autograd(_normalize_double_backward, setup_context=_normalize_backward_setup)


# ------------------------------------------------------- torch.func and vmap ---
# An operator's own autograd registration serves eager tensors and
# torch.compile; torch.func transforms (grad, vjp, jacrev, vmap) need an
# autograd.Function with setup_context instead.  These run the same
# operators and the same derivative functions.  vmap runs the operators
# once per vmapped item: correct, though not fused into one call.
class _MomentsFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor, axes: list[int], keepdim: bool, weights: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        result: tuple[Tensor, Tensor] = moments_op(input, axes, keepdim, weights, mask)
        return result

    setup_context = staticmethod(_moments_setup)
    backward = staticmethod(_moments_backward)


class _NormalizeFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dim: int
    ) -> Tensor:
        result: Tensor = normalize_op(input, mean, var, weight, bias, eps, dim)
        return result

    setup_context = staticmethod(_normalize_setup)
    backward = staticmethod(_normalize_backward)


class _NormalizeBackwardFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, dim: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        result: tuple[Tensor, Tensor, Tensor] = normalize_backward_op(grad_out, input, mean, invstd, weight, dim)
        return result

    setup_context = staticmethod(_normalize_backward_setup)
    backward = staticmethod(_normalize_double_backward)


def _items(info: Any, in_dims: tuple[Any, ...], tensors: Sequence[Tensor | None]) -> list[list[Tensor | None]]:
    """The arguments of each vmapped item: batched tensors sliced, the others as they are."""
    return [
        [t if t is None or d is None else t.select(d, i) for t, d in zip(tensors, in_dims)]
        for i in range(info.batch_size)
    ]


@moments_op.register_vmap
def _moments_vmap(
    info: Any, in_dims: tuple[Any, ...], input: Tensor, axes: list[int], keepdim: bool, weights: Any, mask: Any
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    results = [
        moments_op(x, axes, keepdim, w, m)
        for x, w, m in _items(info, (in_dims[0], in_dims[3], in_dims[4]), (input, weights, mask))
    ]
    return (torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])), (0, 0)


@normalize_op.register_vmap
def _normalize_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Any,
    bias: Any,
    eps: float,
    dim: int,
) -> tuple[Tensor, int]:
    items = _items(info, in_dims[:5], (input, mean, var, weight, bias))
    return torch.stack([normalize_op(*item, eps, dim) for item in items]), 0


@normalize_backward_op.register_vmap
def _normalize_backward_vmap(
    info: Any,
    in_dims: tuple[Any, ...],
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Any,
    dim: int,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
    items = _items(info, in_dims[:5], (grad_out, input, mean, invstd, weight))
    results = [normalize_backward_op(*item, dim) for item in items]
    return tuple(torch.stack([r[k] for r in results]) for k in range(3)), (0, 0, 0)  # type: ignore[return-value]


def moments(
    input: Tensor,
    dim: int | None = None,
    *,
    axes: int | Sequence[int] | None = None,
    keepdim: bool = False,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance, per channel or over given dimensions (``tf.nn.moments``, ``weighted_moments``).

    Differentiable in ``input`` and ``weights`` (twice; reverse mode, and
    ``torch.func.grad``/``jacrev``/``vmap``), on fastbn's kernels, as the
    custom operator ``torch.ops.fastbn.moments``.

    Parameters
    ----------
    input : torch.Tensor
        float16, bfloat16, float32 or float64, on the CPU (used in place, no
        copy) or a CUDA device.
    dim : int, optional
        The channel dimension, kept; every other one is reduced.  Default 1
        (torch's ``(N, C, ...)``) when ``axes`` is not given.  This is
        :func:`fastbn.moments`'s ``axis``; note that it is the dimension
        *kept*, not reduced as ``dim`` is in ``torch.var_mean``.
    axes : int or sequence of int, optional, keyword-only
        Instead of ``dim``: the dimensions reduced, as in
        ``tf.nn.moments(x, axes)`` and ``torch.var_mean(x, dim=axes)``; the
        others are kept.  :func:`fastbn.moments`'s ``axes``.
    keepdim : bool, default False, keyword-only
        Keep the reduced dimensions with size 1 (input's rank), so that the
        results broadcast against ``input`` and feed :func:`normalize`.
        :func:`fastbn.moments`'s ``keepdims``.
    weights : torch.Tensor, optional, keyword-only
        Non-negative, finite, broadcastable to ``input``: the weighted mean
        ``sum(w x) / sum(w)`` and variance ``sum(w (x - mean)^2) / sum(w)``
        (``tf.nn.weighted_moments``); 0 and 0 where ``sum(w)`` is 0.  It gets
        a gradient of its own shape and dtype.
    mask : torch.Tensor, optional, keyword-only
        bool, broadcastable to ``input`` or, with ``dim``, of input's shape
        without ``dim`` (Keras's and Flax's ``mask``): the statistics of the
        positions where it is True, as ``weights=mask``.

    Returns
    -------
    mean, var : torch.Tensor
        float32 for float16/bfloat16/float32 input, float64 for float64; of
        the kept dimensions' shape (``(C,)`` in the channel form), or with
        ``keepdim`` of input's rank.  NaN for an empty batch.

    Raises
    ------
    BatchNormTypeError
        (a TypeError and a RuntimeError) a non-tensor, a dtype fastbn has no
        kernel for, a non-bool mask.
    BatchNormError
        (a ValueError and a RuntimeError) both ``dim`` and ``axes``, both
        ``weights`` and ``mask``, a shape that does not broadcast, a tensor
        on another device, and (from :func:`fastbn.moments`) negative or
        non-finite weights.
    BatchNormIndexError
        A dimension out of range.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> fastbn.torch.moments(x)
    (tensor([3., 4.]), tensor([5., 5.]))
    """
    _check_input(input, "moments")
    reduced, channel = _reduction_axes(input, dim, axes)
    if not isinstance(keepdim, bool):
        raise BatchNormTypeError(f"keepdim: expected a bool, got {type(keepdim).__name__}")
    weights, mask = _moments_weights(input, weights, mask, channel)
    if torch.compiler.is_compiling() or _ops.plain(input, weights, mask):
        mean, var = moments_op(input, reduced, keepdim, weights, mask)
    else:  # torch.func transforms
        mean, var = _MomentsFunction.apply(input, reduced, keepdim, weights, mask)  # type: ignore[no-untyped-call]
    return mean, var


def normalize(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    dim: int | None = None,
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel (``tf.nn.batch_normalization``).

    Differentiable in all five tensors (twice; reverse mode, and
    ``torch.func.grad``/``jacrev``/``vmap``), on fastbn's kernels, as the
    custom operators ``torch.ops.fastbn.normalize`` and
    ``torch.ops.fastbn.normalize_backward``.

    Parameters
    ----------
    input : torch.Tensor
        Rank >= 2, float16, bfloat16, float32 or float64, on the CPU (read in
        place, no copy) or a CUDA device.
    mean, var : torch.Tensor
        The statistics: ``(C,)``, or any shape broadcastable to ``input`` that
        varies along the channel dimension only (``(1, C, 1, 1)``,
        ``(1, 1, 1, C)``, :func:`moments` with ``keepdim=True``), or one
        element; any float dtype (computed in the statistics dtype, float64
        for float64 input and float32 otherwise).  ``var`` non-negative.
    weight, bias : torch.Tensor, optional
        Scale and shift, shapes and dtypes as ``mean``; default 1 and 0.
    eps : float, default 1e-5, keyword-only
        Positive, added to ``var``.
    dim : int, optional, keyword-only
        The channel dimension (:func:`fastbn.normalize`'s ``axis``).  By
        default the dimension along which a parameter of rank >= 2 varies
        (so that ``(1, 1, 1, C)`` statistics, or ``moments(x, axes=[0, 1, 2],
        keepdim=True)`` of NHWC input, need no ``dim``), else 1;
        :func:`fastbn.normalize` itself defaults to 1 whatever the shapes.

    Returns
    -------
    torch.Tensor
        input's shape, dtype and memory format.  Gradients of the parameters
        come back in their own shapes and dtypes.

    Raises
    ------
    BatchNormTypeError
        A non-tensor, a dtype fastbn has no kernel for, a non-float eps.
    BatchNormError
        A parameter whose shape does not fit the channel dimension, a tensor
        on another device, eps not positive, rank < 2, and (from
        :func:`fastbn.normalize`) a negative variance.
    BatchNormIndexError
        ``dim`` out of range.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> fastbn.torch.normalize(x, *fastbn.torch.moments(x))[:, 1].round(decimals=3)
    tensor([-1.3420, -0.4470,  0.4470,  1.3420])
    """
    _check_input(input, "normalize")
    if input.dim() < 2:
        raise BatchNormError(f"input: expected a tensor of rank >= 2 (channels along dim), got {input.dim()}D input")
    parameters = (("mean", mean), ("var", var), ("weight", weight), ("bias", bias))
    for name, value in parameters:
        if value is not None or name in ("mean", "var"):
            _check_tensor(value, name, input, FLOATS, "a float16, bfloat16, float32 or float64")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise BatchNormTypeError(f"eps: expected a positive finite float, got {type(eps).__name__}")
    if not 0 < eps < math.inf:  # (not math.isfinite: under torch.compile, a float default may be symbolic)
        raise BatchNormError(f"eps: expected a positive finite float, got {eps}")
    channel = _channel_dim(input, parameters, dim)
    dtype = _stats_dtype(input.dtype)
    mean, var = (_as_channel_vector(value, name, input, channel, dtype) for name, value in parameters[:2])
    weight, bias = (
        None if value is None else _as_channel_vector(value, name, input, channel, dtype)
        for name, value in parameters[2:]
    )
    if torch.compiler.is_compiling() or _ops.plain(input, mean, var, weight, bias):
        output: Tensor = normalize_op(input, mean, var, weight, bias, eps, channel)
    else:  # torch.func transforms
        output = _NormalizeFunction.apply(input, mean, var, weight, bias, eps, channel)
    return output
