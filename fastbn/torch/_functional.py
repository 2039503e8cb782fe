"""``fastbn.torch.batch_norm``: torch's functional batch norm, with fastbn's fused forms.

Eager calls go through :class:`_BatchNorm`, an ``autograd.Function`` around
the custom operator that adds what an operator registration cannot:
forward-mode AD (``jvp``, for ``torch.func.jvp`` and ``torch.autograd.forward_ad``)
and a vmap rule generated from the operators' own; on plain tensors its
faster twin :class:`_EagerBatchNorm` runs fastbn without operator dispatch.  While torch.compile
traces, the operator is called directly: Dynamo records it as one opaque
node with its registered autograd, and never looks inside.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

import torch

from fastbn import _options
from fastbn.torch import _ops, _reference, _small
from fastbn.torch._checks import REDUCED, BatchNormError, BatchNormTypeError, check_arguments, check_not_dual

__all__ = ["TorchErrors", "batch_norm"]


class TorchErrors:
    """Re-raise fastbn's ``ValueError``/``TypeError`` as the classes that are also torch's ``RuntimeError``."""

    def __enter__(self) -> TorchErrors:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> Literal[False]:
        if kind is not None and not isinstance(value, (BatchNormError, BatchNormTypeError)):
            if issubclass(kind, TypeError):
                raise BatchNormTypeError(str(value)) from value
            if issubclass(kind, ValueError):
                raise BatchNormError(str(value)) from value
        return False


class _BatchNorm(torch.autograd.Function):
    """The forward operator, differentiable in reverse mode (the backward operator) and forward mode.

    The running statistics come packed in a tuple, which autograd does not
    track: they are state, not differentiable inputs (as in torch, whose
    running statistics get no gradient).  Their new values are outputs
    without a gradient, which :func:`batch_norm` copies into them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Any, weight: Any, bias: Any, running: Any, residual: Any, options: Any) -> Any:
        running_mean, running_var = running
        if _ops.plain(input, weight, bias, running_mean, running_var, residual):
            return _ops.run_forward(input, weight, bias, running_mean, running_var, residual, *options, in_place=True)
        return _ops.forward_op(input, weight, bias, running_mean, running_var, residual, *options)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        input, weight, _bias, running, residual, options = inputs
        training, _momentum, eps, relu, virtual_batch_size, _rmax, _dmax = options
        y, saved_mean, saved_invstd, r, d, new_mean, new_var = output
        ctx.mark_non_differentiable(saved_mean, saved_invstd, r, d, new_mean, new_var)
        saved = (input, weight, saved_mean, saved_invstd, r, d, y if relu else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.options = (training or running[0] is None, residual is not None, virtual_batch_size, eps)

    @staticmethod
    def backward(ctx: Any, grad_y: Any, *_grad_statistics: Any) -> Any:
        dx, dweight, dbias, dres = _ops.gradients(ctx, grad_y, residual_index=4)
        return dx, dweight, dbias, None, dres, None

    @staticmethod
    def jvp(
        ctx: Any, t_input: Any, t_weight: Any, t_bias: Any, _t_running: Any, t_residual: Any, _t_options: Any
    ) -> Any:
        input, weight, saved_mean, saved_invstd, r, d, y = ctx.saved_tensors
        batch_stats, _residual, _vbs, _eps = ctx.options
        groups = saved_mean.shape[0] if saved_mean.dim() == 2 else 1
        t_y = _reference.tangent(
            input,
            t_input,
            weight,
            t_weight,
            t_bias,
            t_residual,
            saved_mean,
            saved_invstd,
            r,
            d,
            y,
            batch_stats=batch_stats,
            groups=groups,
        )
        return t_y, None, None, None, None, None, None


class _EagerBatchNorm(torch.autograd.Function):
    """:class:`_BatchNorm` for plain eager tensors, in the older ``forward(ctx, ...)`` form.

    Same context, backward and jvp; it exists for speed: torch binds the
    arguments of a ``setup_context`` Function through ``inspect`` on every
    call, tens of microseconds that a small batch norm would notice.  It
    serves reverse and forward mode (``torch.autograd.forward_ad``); under
    ``torch.func`` transforms tensors are wrapped, and :class:`_BatchNorm`
    serves.
    """

    @staticmethod
    def forward(ctx: Any, input: Any, weight: Any, bias: Any, running: Any, residual: Any, options: Any) -> Any:
        # mypy cannot tell that *options (seven values) stops before the keyword-only in_place.
        outputs = _ops.run_forward(input, weight, bias, *running, residual, *options, in_place=True)  # type: ignore[misc]
        y, saved_mean, saved_invstd, r, d, _, _ = outputs
        saved = (input, weight, saved_mean, saved_invstd, r, d, y if options[3] else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.options = (options[0] or running[0] is None, residual is not None, options[4], options[2])
        return y  # the running statistics are updated in place already

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> Any:
        return _BatchNorm.backward(ctx, grad_y)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        return _BatchNorm.jvp(ctx, *tangents)[0]


def _fused_options(
    activation: Any, virtual_batch_size: Any, renorm: Any
) -> tuple[bool, int | None, float | None, float | None]:
    """The fused forms' options checked by fastbn's own rules: ``(relu, virtual_batch_size, rmax, dmax)``."""
    with TorchErrors():
        relu = _options.check_activation(activation) == "relu"
        virtual_batch_size = _options.check_virtual_batch_size(virtual_batch_size)
        renorm = _options.check_renorm(renorm)
    rmax, dmax = (None, None) if renorm is None else renorm
    return relu, virtual_batch_size, rmax, dmax


def _widen(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """float16/bfloat16 parameters as float32, differentiably (the gradient comes back in their dtype)."""
    return tensor.float() if tensor is not None and tensor.dtype in REDUCED else tensor


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Literal["relu"] | None = None,
    residual: torch.Tensor | None = None,
    virtual_batch_size: int | None = None,
    renorm: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Batch normalization over dimension 1, like ``torch.nn.functional.batch_norm``, plus fastbn's fused forms.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, ...)`` of any rank >= 2, dtype float16, bfloat16, float32 or
        float64, on the CPU or a CUDA device, in any memory format.  An empty
        batch gives an empty output and leaves the running statistics as
        they are (as torch).
    running_mean, running_var : torch.Tensor or None
        ``(C,)`` running statistics, updated in place in training; required
        in eval.  Their dtype is the input's, or float32 for float16 and
        bfloat16 input (torch's rule).
    weight, bias : torch.Tensor, optional
        ``(C,)`` scale and shift, dtypes as the running statistics; gradients
        flow to them.
    training : bool, default False
        Batch statistics (and a running-statistics update) if True; the
        running statistics if False.
    momentum : float, default 0.1
        ``running = (1 - momentum) * running + momentum * batch`` with the
        unbiased batch variance; any finite float, as torch.
    eps : float, default 1e-5
        Added to the variance: positive in training, non-negative in eval.
    activation : {None, "relu"}, keyword-only
        ``"relu"``: return ``relu(BN(input) + residual)``, in the same pass.
    residual : torch.Tensor, optional, keyword-only
        Added before the activation; input's shape, dtype and device.  It
        gets a gradient.
    virtual_batch_size : int, optional, keyword-only
        Ghost batch norm: each group of this many samples is normalised with
        its own statistics in training (see :func:`fastbn.forward`).
    renorm : tuple of (float, float), optional, keyword-only
        ``(rmax, dmax)``: batch renormalization in training (see
        :func:`fastbn.forward`); needs the running statistics.

    Returns
    -------
    torch.Tensor
        Same shape, dtype, device and memory format as ``input``; part of the
        autograd graph when any of input, weight, bias, residual requires
        grad.  First and second derivatives are exact in reverse mode, and
        forward mode (jvp) is supported; ``torch.func.vmap`` runs a batch of
        independent batch norms.

    Raises
    ------
    BatchNormError
        (a ValueError and a RuntimeError) where torch raises either: sizes
        that do not match ("running_mean should contain 3 elements not 4"),
        missing running statistics in eval, a bad eps, a single value per
        channel in training; and for fastbn's own options.  Nothing has run
        or been updated.
    BatchNormTypeError
        (a TypeError and a RuntimeError) for a non-tensor or a dtype torch's
        CPU batch norm refuses ("mixed dtype").

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.arange(8.0).reshape(4, 2)
    >>> running_mean, running_var = torch.zeros(2), torch.ones(2)
    >>> y = fastbn.torch.batch_norm(x, running_mean, running_var, training=True)
    >>> y[:, 0].round(decimals=3), running_mean
    (tensor([-1.3420, -0.4470,  0.4470,  1.3420]), tensor([0.3000, 0.4000]))
    >>> w = torch.ones(2, requires_grad=True)
    >>> fastbn.torch.batch_norm(x, None, None, w, training=True, activation="relu").sum().backward()
    >>> w.grad.round(decimals=3)
    tensor([1.7890, 1.7890])
    """
    if (
        activation is None
        and residual is None
        and virtual_batch_size is None
        and renorm is None
        and not torch.compiler.is_compiling()
    ):
        small = _small.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if small is not None:  # a small plain call (see fastbn.torch._small)
            return small
    check_arguments(input, running_mean, running_var, weight, bias, residual, training, momentum, eps)
    check_not_dual(input, running_mean, running_var, training)
    relu, virtual_batch_size, rmax, dmax = _fused_options(activation, virtual_batch_size, renorm)
    if input.numel() == 0:
        return _empty_batch(input, weight, bias, residual, relu)
    weight, bias = _widen(weight), _widen(bias)
    running = (_widen(running_mean), _widen(running_var))
    options = (bool(training), float(momentum), float(eps), relu, virtual_batch_size, rmax, dmax)
    with TorchErrors():
        if torch.compiler.is_compiling():
            outputs: tuple[torch.Tensor, ...] = _ops.forward_op(input, weight, bias, *running, residual, *options)
        elif _ops.plain(input, weight, bias, *running, residual):
            if _ops.tracked(input, weight, bias, residual):
                # torch.autograd.Function.apply is unannotated.
                output: torch.Tensor = _EagerBatchNorm.apply(  # type: ignore[no-untyped-call]
                    input, weight, bias, running, residual, options
                )
            else:  # nothing to differentiate: no autograd node at all
                output = _ops.run_forward(
                    input, weight, bias, running[0], running[1], residual, *options, in_place=True
                )[0]
            if training and running[0] is not running_mean:  # float32 copies of float16 buffers
                _ops.write_running(running_mean, running_var, *running)
            return output
        else:
            outputs = _BatchNorm.apply(input, weight, bias, running, residual, options)  # type: ignore[no-untyped-call]
    if training and running_mean is not None:
        # In place, as torch updates its buffers: versions bump, views see it.
        # Eager calls on plain tensors updated them in place already (and
        # return no new values), or updated float32 copies of float16 ones.
        updated = outputs[5:7] if outputs[5].numel() else running
        if updated[0] is not running_mean:
            _ops.write_running(running_mean, running_var, updated[0], updated[1])
    return outputs[0]


def _empty_batch(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """An empty batch, as torch computes it: no statistics, running statistics untouched.

    ``input * weight + bias`` on no elements, in torch operations, so that the
    gradients are torch's too: empty for the input, zeros for weight and bias,
    and no second derivative in the input (the map is linear in it).  1-D
    input, which torch takes only empty, has no channels to broadcast over.
    """
    output = input.clone()
    if input.dim() >= 2:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        if weight is not None:
            output = output * weight.reshape(shape).to(input.dtype)
        if bias is not None:
            output = output + bias.reshape(shape).to(input.dtype)
    if residual is not None:
        output = output + residual
    return torch.relu(output) if relu else output


def _at_level_of(value: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The new running statistic ``value`` unwrapped down to the functorch level of ``buffer``.

    Under ``torch.func.grad``/``jvp`` the result is wrapped for
    differentiation, but running statistics are state, not differentiable:
    the plain values are written, as torch's own update does.  A vmapped
    result cannot go into a buffer that is not vmapped; torch's error is
    raised then.
    """
    if torch.compiler.is_compiling():  # no functorch levels in a traced graph
        return value
    functorch = torch._C._functorch
    level = functorch.maybe_get_level(buffer)
    while functorch.is_functorch_wrapped_tensor(value) and functorch.maybe_get_level(value) > level:
        if functorch.is_batchedtensor(value):
            raise BatchNormError(
                "running_mean: Batch norm got a batched tensor as input while the running_mean or running_var, "
                "which will be updated in place, were not batched; vmap over them too, or leave them None"
            )
        value = functorch.get_unwrapped(value)
    return value
