"""Batch norm written with torch operations: the derivatives fastbn's kernels do not compute.

fastbn's kernels compute the forward and the first-order backward.  What
they leave to torch is written here, once, as plain differentiable torch code
on the same saved values:

* :func:`backward`, the first-order gradients as a function of
  ``(grad_out, x, weight)``.  In training it recomputes the batch mean and
  variance from ``x`` with torch, so that autograd through it gives the exact
  second derivative, the dependence of the statistics on ``x`` included;
  the double backward of the custom operator is its vector-Jacobian product.
* :func:`tangent`, forward-mode AD (the jvp) of the forward.

They run in the statistics dtype (float32 for float16/bfloat16/float32 input,
float64 for float64), as the kernels do; the channel axis is 1.
"""

from __future__ import annotations

import torch

__all__ = ["backward", "stats_dtype", "tangent"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (half and bfloat16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(vector: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast against ``(N, C, ...)``."""
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


def _grouped(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, ...)`` as ``(G, N / G, C, ...)``: one slice per ghost batch."""
    return tensor.reshape((groups, tensor.shape[0] // groups, *tuple(tensor.shape[1:])))


def _group_dims(ndim: int) -> list[int]:
    """The dimensions of a grouped ``(G, n, C, ...)`` tensor that statistics reduce over."""
    return [1, *list(range(3, ndim + 1))]


def _group_stats(
    xg: torch.Tensor, saved_mean: torch.Tensor, saved_invstd: torch.Tensor, batch_stats: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and invstd broadcastable against grouped ``xg``: from ``xg`` (differentiably) or the saved ones."""
    if batch_stats:
        var, mean = torch.var_mean(xg, dim=_group_dims(xg.dim() - 1), correction=0, keepdim=True)
        return mean, torch.rsqrt(var + eps)
    shape = (saved_mean.shape[0] if saved_mean.dim() == 2 else 1, 1, -1) + (1,) * (xg.dim() - 3)
    return saved_mean.reshape(shape), saved_invstd.reshape(shape)


def _sum_channels(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a grouped ``(G, n, C, ...)`` tensor to ``(C,)``."""
    return tensor.sum(dim=[0, *_group_dims(tensor.dim() - 1)])


def _factors(
    r: torch.Tensor | None, d: torch.Tensor | None, ndim: int
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Renorm's ``r`` and ``d`` broadcast against a grouped tensor, or (1, 0) without renorm."""
    if r is None or r.numel() == 0:
        return None, None
    assert d is not None  # renorm's r and d come together
    shape = (1, 1, -1) + (1,) * (ndim - 2)
    return r.reshape(shape), d.reshape(shape)


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    saved_mean: torch.Tensor,
    saved_invstd: torch.Tensor,
    r: torch.Tensor | None,
    d: torch.Tensor | None,
    output: torch.Tensor | None,
    *,
    batch_stats: bool,
    eps: float,
    groups: int,
    residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients ``(dx, dweight, dbias, dresidual)`` of batch norm, in torch.

    Parameters
    ----------
    grad_out, x : torch.Tensor
        ``(N, C, ...)``: the gradient of the output, and the forward input.
    weight : torch.Tensor or None
        ``(C,)``, or None for a unit scale.
    saved_mean, saved_invstd : torch.Tensor
        What the forward normalised with, ``(C,)`` or ``(G, C)``; read only in
        eval (``batch_stats`` False), where they are constants.
    r, d : torch.Tensor or None
        Batch renormalization's constants, ``(C,)``, or None / empty.
    output : torch.Tensor or None
        The forward's output where it applied a ReLU (its mask), else None.
    batch_stats : bool
        Whether the forward used batch statistics (recomputed here from ``x``).
    eps : float
        The forward's eps.
    groups : int
        Ghost batches (1 without them).
    residual : bool
        Whether the forward added a residual (its gradient is then returned).

    Returns
    -------
    tuple
        ``dx`` like ``x``; ``dweight``, ``dbias`` of shape ``(C,)`` in the
        statistics dtype; ``dresidual`` like ``x``, or None.

    Notes
    -----
    With ``xhat = (x - mean) * invstd`` and ``g`` the upstream gradient (times
    the ReLU mask), the output is ``w * (r * xhat + d) + b``.  In training, for
    ``n`` values per channel of a (ghost) batch and ``h = g * w * r``::

        dx = invstd * (h - mean(h) - xhat * mean(h * xhat))

    and in eval ``dx = g * w * invstd``; ``dweight = sum(g * (r * xhat + d))``
    and ``dbias = sum(g)``.  Renorm's ``r`` and ``d`` are constants (Ioffe
    2017), as in fastbn's kernels.
    """
    dtype = stats_dtype(x.dtype)
    g = grad_out.to(dtype)
    if output is not None:
        g = g * (output > 0)
    gg, xg = _grouped(g, groups), _grouped(x.to(dtype), groups)
    mean, invstd = _group_stats(xg, saved_mean.to(dtype), saved_invstd.to(dtype), batch_stats, eps)
    xhat = (xg - mean) * invstd
    r, d = _factors(r, d, x.dim())
    w = 1.0 if weight is None else _channel(weight.to(dtype), x.dim()).unsqueeze(0)
    scaled = xhat if r is None else r * xhat + d  # type: ignore[operator]  # d is a tensor where r is (_factors)
    h = gg * w if r is None else gg * (w * r)
    if batch_stats:
        dims = _group_dims(x.dim())
        dx = invstd * (h - h.mean(dim=dims, keepdim=True) - xhat * (h * xhat).mean(dim=dims, keepdim=True))
    else:
        dx = h * invstd
    dx = dx.reshape(x.shape).to(x.dtype)
    dres = g.to(x.dtype) if residual else None
    return dx, _sum_channels(gg * scaled), _sum_channels(gg), dres


def tangent(
    x: torch.Tensor,
    tx: torch.Tensor | None,
    weight: torch.Tensor | None,
    tweight: torch.Tensor | None,
    tbias: torch.Tensor | None,
    tresidual: torch.Tensor | None,
    saved_mean: torch.Tensor,
    saved_invstd: torch.Tensor,
    r: torch.Tensor | None,
    d: torch.Tensor | None,
    output: torch.Tensor | None,
    *,
    batch_stats: bool,
    groups: int,
) -> torch.Tensor:
    """The forward-mode derivative (jvp) of the output, given the inputs' tangents (None for zero).

    With the notation of :func:`backward`, in training (per ghost batch)
    ``t_xhat = invstd * (tx - mean(tx) - xhat * mean(xhat * tx))``; in eval
    ``t_xhat = invstd * tx``.  Then ``t_y = w * r * t_xhat + tw * (r * xhat +
    d) + tb + t_residual``, times the ReLU mask where the forward applied one.
    """
    dtype = stats_dtype(x.dtype)
    xg = _grouped(x.to(dtype), groups)
    mean, invstd = _group_stats(xg, saved_mean.to(dtype), saved_invstd.to(dtype), False, 0.0)
    xhat = (xg - mean) * invstd
    r, d = _factors(r, d, x.dim())
    total = torch.zeros_like(xg)
    if tx is not None:
        txg = _grouped(tx.to(dtype), groups)
        if batch_stats:
            dims = _group_dims(x.dim())
            txg = txg - txg.mean(dim=dims, keepdim=True) - xhat * (xhat * txg).mean(dim=dims, keepdim=True)
        t_xhat = invstd * txg
        if r is not None:
            t_xhat = r * t_xhat
        total = total + (t_xhat if weight is None else _channel(weight.to(dtype), x.dim()).unsqueeze(0) * t_xhat)
    if tweight is not None:
        scaled = xhat if r is None else r * xhat + d  # type: ignore[operator]  # as in backward
        total = total + _channel(tweight.to(dtype), x.dim()).unsqueeze(0) * scaled
    if tbias is not None:
        total = total + _channel(tbias.to(dtype), x.dim()).unsqueeze(0)
    total = total.reshape(x.shape)
    if tresidual is not None:
        total = total + tresidual.to(dtype)
    if output is not None:
        total = total * (output > 0)
    return total.to(x.dtype)
