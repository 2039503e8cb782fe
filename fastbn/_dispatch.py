"""Pick the backend for a call and bring its arrays to that backend.

The backend follows ``x`` (host arrays: the CPU; arrays exposing
``__cuda_array_interface__``: CUDA) unless ``backend=`` forces one; an
argument on the other side of the host/device line is an error, never a
silent copy.  The backend is a :class:`fastbn.backends.Backend`, loaded on
first use (the CUDA one only when a GPU array or ``backend="cuda"`` asks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

from fastbn import backends
from fastbn._frameworks import framework_of, is_device_array

__all__ = ["backend_for", "prepare"]


def backend_for(obj: Any) -> backends.Backend:
    """The backend that computes on ``obj``: CUDA for GPU arrays, else the CPU."""
    return backends.load("cuda" if is_device_array(obj) else "cpu")


def prepare(
    backend: str | None, arrays: Sequence[tuple[str, Any]], read_only: Collection[str] = ()
) -> tuple[backends.Backend, Callable[[Any], Any], list[Any]]:
    """Choose the backend and convert the call's arrays for it.

    Parameters
    ----------
    backend : {None, "cpu", "cuda"}
        None follows the first array of ``arrays`` (``x`` or ``dy``).
    arrays : sequence of (str, object)
        The call's array arguments by name, the input first; None entries are
        optional arguments not given.
    read_only : collection of str, optional
        Names of running statistics that this call only reads (``fold``), so
        that a list or other convertible object is taken for them as for any
        input instead of refused as an update that would be lost.

    Returns
    -------
    ops : Backend
        The backend.
    restore : callable
        Turns a backend array into the caller's kind (that of the input).
    converted : list
        The arrays, converted for the backend, in the order given.
    """
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend: expected None, 'cpu' or 'cuda', got {backend!r}")
    first_name, first = arrays[0]
    target = backend or ("cuda" if is_device_array(first) else "cpu")
    for name, obj in arrays:
        if obj is None:
            continue
        if isinstance(obj, (str, bytes)):
            raise TypeError(f"{name}: expected an array, got {type(obj).__name__}")
        _check_not_tracked(obj, name)
        on_device = is_device_array(obj)
        because = (
            f"backend={backend!r}" if backend else f"{first_name} is a {'GPU' if target == 'cuda' else 'host'} array"
        )
        if target == "cpu" and on_device:
            raise ValueError(
                f"{name}: is a GPU array but this call runs on the CPU (because {because}); "
                "pass host arrays, or GPU arrays for every argument"
            )
        if target == "cuda" and not on_device:
            raise ValueError(
                f"{name}: is a host array but this call runs on the GPU (because {because}); "
                "pass GPU arrays for every argument"
            )
    ops = backends.load(target).for_call(arrays)
    return ops, ops.restorer(first), [ops.to_backend(obj, name, read_only=name in read_only) for name, obj in arrays]


def _check_not_tracked(obj: Any, name: str) -> None:
    """Refuse a torch tensor that autograd tracks: the result would silently leave the graph.

    fastbn's array API works outside autograd; :func:`fastbn.torch.batch_norm`
    is the differentiable entry point.  Under ``torch.no_grad()`` nothing is
    tracked, so nothing is lost and the tensor is taken.
    """
    if framework_of(obj) != "torch" or not getattr(obj, "requires_grad", False):
        return
    if sys.modules["torch"].is_grad_enabled():
        raise TypeError(
            f"{name}: this torch tensor requires grad, but fastbn's array API works outside autograd, so the "
            "result would be silently detached; use fastbn.torch.batch_norm (or the fastbn.torch modules), "
            "which are differentiable, or pass tensor.detach()"
        )
