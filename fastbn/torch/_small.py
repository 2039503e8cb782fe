"""The small-call lane of :func:`fastbn.torch.batch_norm`: plain CPU tensors, no fused option, few Python steps.

A (32, 64) batch norm is a microsecond of arithmetic; the general path of
:func:`fastbn.torch.batch_norm` spends tens of microseconds around it (torch's
argument checks, the operator or ``autograd.Function`` machinery, NumPy views,
:func:`fastbn.forward`'s own checks), several times what
``torch.nn.functional.batch_norm`` spends.  :func:`batch_norm` here takes the
plainest calls (eager, no forward-mode AD level open, ordinary tensors on the
CPU, a training call or an eval call with running statistics) straight to
:mod:`fastbn.backends.cpu.small`, and returns None for anything else, and for
anything that would be an error: the general path then takes it, with
torch's checks and messages.  :class:`_SmallBatchNorm` differentiates it with
the same kernels; its context is that of the general path's Function, so a
double backward (``create_graph=True``) goes the general way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from fastbn import _api
from fastbn.backends.cpu.views import to_torch as _tensor
from fastbn.torch import _ops
from fastbn.torch._arrays import array as _array

__all__ = ["batch_norm"]


_transforms_active = torch._C._are_functorch_transforms_active


def _no_dual_level() -> bool:
    """Whether no forward-mode AD level is open (then no tensor carries a tangent)."""
    return getattr(fwAD, "_current_level", 0) == -1


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: Any,
    momentum: Any,
    eps: Any,
) -> torch.Tensor | None:
    """The output of a small plain call, its running statistics updated in place; None if it is not one.

    Each step is one of the fewest Python operations that decide it: this
    runs on every call of a small layer, where torch's own batch norm takes
    a few tens of microseconds in all.
    """
    if type(momentum) is not float or type(eps) is not float or type(training) is not bool:
        return None
    if input is None or (running_mean is None and not training):
        return None  # torch refuses them: the general path raises
    if not _no_dual_level() or _transforms_active():
        return None  # jvp, vmap, grad transforms: the general path's operators handle them
    # A non-tensor input (the general path names it), a meta or GPU one: False, as anything not plain.
    arrays = [_array(t) for t in (input, weight, bias)] + [_array(t, training) for t in (running_mean, running_var)]
    for view in arrays:
        if view is False:  # (``False in arrays`` would compare arrays elementwise)
            return None
    grad_enabled = torch.is_grad_enabled()
    for buffer in (running_mean, running_var):
        if buffer is not None and buffer.requires_grad and grad_enabled:
            return None  # torch refuses it
    if grad_enabled and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        # The options travel as one argument (Function.apply inspects each argument it is given); the
        # C-level apply, as Function.apply itself calls it once no functorch transform is active.
        output: torch.Tensor | None = _apply(  # type: ignore[no-untyped-call]  # torch's C apply is unannotated
            input, weight, bias, (arrays, training, momentum, eps)
        )
        if output is None:
            return None  # the kernels' lane refused it; nothing has run
    else:
        small = _api._small().forward(*arrays, training, momentum, eps, 1)
        if small is None:
            return None
        output = _tensor(small[0])
    if training and running_mean is not None and running_var is not None:
        for buffer in (running_mean, running_var):
            if not buffer.is_inference():
                torch.autograd.graph.increment_version(buffer)
    return output


class _SmallBatchNorm(torch.autograd.Function):
    """The lane's differentiable form: forward and first backward on :mod:`fastbn.backends.cpu.small`.

    It saves only ``input`` and ``weight`` as tensors (so that torch checks
    they were not modified in place before backward) and keeps the small
    forward's plan (its NumPy views and statistics) beside them, so the
    backward repeats none of its checks.  A backward the lane does not take
    (a double backward, a gradient that is not a plain CPU tensor) goes the
    general way (:func:`fastbn.torch._ops.gradients`), given the context
    the general path's Function would have made.  If the kernels' lane
    refuses the call, forward returns None and nothing has run: the caller
    then takes the general path (the None never reaches a graph).
    """

    @staticmethod
    def forward(ctx: Any, input: Any, weight: Any, bias: Any, options: Any) -> Any:
        arrays, training, momentum, eps = options
        small = _api._small().forward(*arrays, training, momentum, eps, 1)
        if small is None:
            return None
        y, (mean, invstd, batch_stats, *_), plan = small
        ctx.save_for_backward(input, weight)
        ctx.small = (plan, mean, invstd, batch_stats, eps)
        return _tensor(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> Any:
        input, weight = ctx.saved_tensors  # torch's check that neither was modified in place
        plan = ctx.small[0]
        small = None
        if plan is not None and grad_y is not None and not grad_y.requires_grad:
            dy = _array(grad_y)
            if dy is not False:
                small = _api._small().backward_planned(dy, plan)
        if small is None:
            general = _GeneralContext(ctx, input, weight)
            dx, dweight, dbias, _ = _ops.gradients(general, grad_y, residual_index=4)
            return dx, dweight, dbias, None
        need = ctx.needs_input_grad
        return (
            _tensor(small[0]) if need[0] else None,
            _tensor(small[1]) if need[1] and weight is not None else None,
            _tensor(small[2]) if need[2] else None,
            None,
        )


# Function.apply without its Python layer (which binds default arguments and unwraps functorch's dead
# wrappers, none of which applies here: the lane is left whenever a functorch transform is active).
_apply = super(torch.autograd.Function, _SmallBatchNorm).apply


class _GeneralContext:
    """What :func:`fastbn.torch._ops.gradients` reads from a context, made from :class:`_SmallBatchNorm`'s."""

    def __init__(self, ctx: Any, input: torch.Tensor, weight: torch.Tensor | None) -> None:
        _plan, mean, invstd, batch_stats, eps = ctx.small
        saved_mean, saved_invstd = _tensor(mean), _tensor(invstd)
        empty = saved_mean.new_empty(0)
        self.saved_tensors = (input, weight, saved_mean, saved_invstd, empty, empty, None)
        self.options = (batch_stats, False, None, eps)
        self.needs_input_grad = ctx.needs_input_grad
