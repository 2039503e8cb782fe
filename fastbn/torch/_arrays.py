"""NumPy views of plain CPU tensors, for the small-call lanes (:mod:`fastbn.torch._small`, and the
general path's backward in :mod:`fastbn.torch._ops`), the small backward they share, and the
running statistics eval only reads (:func:`read_only_stat`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastbn import _api
from fastbn.backends.cpu import views

__all__ = ["array", "is_cow", "read_only_stat", "small_backward"]

_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch = torch._C._functorch
# What the lanes take: bfloat16 through views.bfloat16_numpy, and back through views.to_torch.
_BFLOAT16 = torch.bfloat16
_DTYPES = (torch.float32, torch.float64, torch.float16, _BFLOAT16)
_is_cow_tensor: Callable[[torch.Tensor], bool] = torch._C._is_cow_tensor  # type: ignore[attr-defined]  # not in stubs


_STRIDED = torch.strided


def is_cow(tensor: torch.Tensor) -> bool:
    """Whether a tensor is copy-on-write (a ``torch._lazy_clone``) and not yet materialized.

    Only strided tensors have storage to ask about (a sparse one raises).
    """
    return tensor.layout == torch.strided and _is_cow_tensor(tensor)


def array(tensor: torch.Tensor | None, written: bool = False) -> Any:
    """A NumPy view of a tensor the lane takes (None stays None), or False.

    ``written``: the lane writes into it (running statistics in training),
    so a copy-on-write tensor is given its own memory first, as torch does.

    The checks are the fewest that make ``numpy()`` a view of the tensor's
    own memory (it runs for every tensor of every small call).  ``numpy()``
    itself refuses a neg or conj view, another device, a sparse or
    storage-less tensor, and a wrapper that escaped a vmap; with
    ``force=True`` (a tensor that requires grad, only read) it would
    resolve or copy those instead, so the device and the neg bit are
    checked first, and functorch's wrappers, which have no storage of their
    own, are refused.
    """
    if tensor is None:
        return None
    if type(tensor) not in _TYPES or not tensor.is_cpu or tensor.dtype not in _DTYPES or tensor.is_neg():
        return False
    if _functorch.is_functorch_wrapped_tensor(tensor) or _functorch.is_legacy_batchedtensor(tensor):
        # A wrapper that escaped its transform, or a legacy batched gradient (gradcheck's batched-grad
        # check): no storage of its own. The general path's operators handle them.
        return False
    if not written and tensor.layout is _STRIDED and _is_cow_tensor(tensor):  # is_cow, inlined: every small call
        return views.cow_view(tensor)  # read without copying a copy-on-write tensor's memory
    try:
        if tensor.dtype is _BFLOAT16:  # the same 16 bits, still a view of the tensor's memory
            return views.bfloat16_numpy(tensor)
        # force=True detaches in C++ (cheaper than .detach() here); a neg view and another device were
        # refused above, so it is a view of the tensor's own memory, never a copy.
        return tensor.numpy(force=True) if tensor.requires_grad else tensor.numpy()
    except (RuntimeError, TypeError):  # no storage (a wrapper subclass, a functional tensor), conj views
        return False


def small_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    saved_mean: torch.Tensor,
    saved_invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The general path's training-mode gradients ``(dx, dweight, dbias, empty)`` of a small plain call; else None.

    For :func:`fastbn.torch._ops._run_backward` (the backward operator, and
    backward calls the lane did not take).
    """
    arrays = [array(t) for t in (grad_out, input, weight, saved_mean, saved_invstd)]
    if any(a is False for a in arrays):
        return None
    dy, x = arrays[0], arrays[1]
    small = _api._small().backward(dy, x, *arrays[2:], x.shape, 1, 1)
    if small is None:
        return None
    dx, dweight, dbias = (views.to_torch(g) for g in small)
    return dx, dweight, dbias, input.new_empty(0)


def read_only_stat(tensor: torch.Tensor | None) -> Any:
    """A running statistic that is only read (eval), as fastbn's kernels may take it.

    A copy-on-write CPU tensor becomes a read-only NumPy view, which leaves
    its memory shared (what torch's own batch norm does in eval), and a
    negated view its resolved values; anything else is passed as it is.  In
    training the statistics are written, and go the writable way.
    """
    if tensor is None or tensor.device.type != "cpu":
        return tensor
    if tensor.is_neg():  # a lazily negated view (which fastbn's views refuse): its values, resolved; only read
        return tensor.resolve_neg()
    return views.cow_view(tensor) if is_cow(tensor) else tensor
