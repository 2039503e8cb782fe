"""How a caller's GPU array becomes a kernel input, and a kernel's output the caller's kind of array.

Inputs are any objects exposing ``__cuda_array_interface__`` (Numba device
arrays, CuPy arrays, PyTorch CUDA tensors): :func:`to_device` wraps them as
Numba device arrays without a copy, and :func:`restorer` turns results back
into the caller's kind, without a copy either.

Every kernel reads flat, contiguous 1-D arrays in one of the two memory
orders of :mod:`fastbn._layout` (ROWS or SLAB).  :class:`Layout` picks the
order of ``x``; :class:`FlatAccess` is how one array reaches a kernel in a
given order: a zero-copy 1-D view when it is contiguous in that order, else
a ``gather`` launch into a new flat array.  Outputs are allocated in x's
memory order (:meth:`Layout.empty`), so a channels-last input gives a
channels-last output.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn import _layout
from fastbn._frameworks import framework_of
from fastbn.backends.cuda import context, target
from fastbn.backends.cuda.plan import GATHER_RANK, gather_flat

__all__ = ["FlatAccess", "Layout", "byte_strides", "grouped", "restorer", "split", "to_device", "vector"]


# ------------------------------------------------------------ conversion ---
def to_device(obj: Any, name: str) -> Any:
    """Return ``obj`` as a numba device array, without copying (None stays None).

    Parameters
    ----------
    obj : object
        Anything exposing ``__cuda_array_interface__``.
    name : str
        The argument's name, for the error message.

    Raises
    ------
    TypeError
        If ``obj`` is not a GPU array, or its interface cannot be read (a
        PyTorch tensor that requires grad, for one), or it is bfloat16, which
        only the CPU kernels take; the message starts with ``name``.
    """
    if obj is None:
        return None
    # Before reading the interface: its typestr for bfloat16 is an opaque "<V2"
    # (torch refuses to export one at all), and no CUDA kernel converts it.
    if str(getattr(obj, "dtype", "")).rpartition(".")[2] == "bfloat16":
        raise TypeError(
            f"{name}: bfloat16 is not supported on the CUDA backend (its kernels take float16, "
            "float32 or float64); convert it (e.g. to float16 or float32), or pass host arrays "
            "to run on the CPU, which takes bfloat16"
        )
    try:
        if target.is_device_array(obj) or hasattr(obj, "__cuda_array_interface__"):
            return target.as_device_array(obj)
    except Exception as exc:
        raise TypeError(f"{name}: cannot be used as a GPU array ({type(exc).__name__}: {exc})") from None
    raise TypeError(
        f"{name}: expected a GPU array (an object exposing __cuda_array_interface__), got {type(obj).__name__}"
    )


def restorer(like: Any) -> Callable[[Any], Any]:
    """Return a function turning result device arrays into the kind of ``like``.

    A PyTorch tensor ``like`` gives tensors on its device (``torch.as_tensor``)
    and a CuPy one gives CuPy arrays (``cupy.asarray``), both zero-copy
    through ``__cuda_array_interface__``; numba device arrays, and any other
    kind, give numba device arrays.  The framework is recognised by
    :func:`fastbn._frameworks.framework_of` and its module taken from
    ``sys.modules``: fastbn never imports a framework the caller has not
    imported.
    """
    framework = framework_of(like)
    module = sys.modules.get(framework)
    if framework == "torch" and module is not None:
        device = like.device
        return lambda array: _torch_result(module, array, device)
    if framework == "cupy" and module is not None:
        asarray: Callable[[Any], Any] = module.asarray
        return asarray
    # Numba arrays: bound to the call's stream, so that a later call (backward on forward's output) and
    # any consumer of the interface's stream field are ordered after the kernels that write them.
    stream = context.current().stream
    if stream is None or target.SIMULATOR:
        return lambda array: array
    return lambda array: array.bind(stream)


def _torch_result(torch: ModuleType, array: Any, device: Any) -> Any:
    """A fastbn result as a view of the torch tensor its memory came from (torch's caching allocator).

    ``torch.as_tensor`` of the device array would wrap the memory in a tensor
    torch does not know it allocated (``record_stream``, IPC and CUDA-graph
    memory pools would not see it); results allocated through
    :mod:`fastbn.backends.cuda.context` carry their tensor, so the result is
    that tensor, viewed with the array's dtype, shape and strides.
    """
    owner = array
    for _ in range(8):  # view of a view of ... the raw allocation
        tensor = getattr(owner, "_fastbn_tensor", None)
        if tensor is not None:
            break
        owner = getattr(getattr(owner, "gpu_data", None), "_owner", None)
        owner = getattr(owner, "_owner", owner)  # target._Interface keeps the array it views
        if owner is None:
            break
    else:
        tensor = None
    if tensor is None or not array.size:
        return torch.as_tensor(array, device=device)
    dtype = np.dtype(array.dtype)
    pointer = target.interface(array)["data"][0]
    offset = pointer - tensor.data_ptr()
    strides = byte_strides(array)
    if offset % dtype.itemsize or any(s % dtype.itemsize for s in strides) or tensor.numel() % dtype.itemsize:
        return torch.as_tensor(array, device=device)
    typed = tensor.view(_TORCH_DTYPES[dtype.name](torch))
    return typed.as_strided(tuple(array.shape), tuple(s // dtype.itemsize for s in strides), offset // dtype.itemsize)


_TORCH_DTYPES: dict[str, Callable[[ModuleType], Any]] = {
    "float16": lambda torch: torch.float16,
    "float32": lambda torch: torch.float32,
    "float64": lambda torch: torch.float64,
}


# --------------------------------------------------------------- layouts ---
def byte_strides(array: Any) -> tuple[int, ...]:
    """The byte strides of a device array (its interface omits them when it is C-contiguous)."""
    strides = target.interface(array).get("strides")
    if strides is None:
        return target.c_strides(tuple(array.shape), np.dtype(array.dtype).itemsize)
    return tuple(strides)


class FlatAccess:
    """How one array reaches a kernel in a given memory order: a flat view, or a gather into a new flat array.

    Parameters
    ----------
    array : device array
        The array, of any strides.
    order : list of int
        Its dimensions in the kernel's memory order, slowest first.
    name : str
        The argument's name, for error messages.

    Raises
    ------
    ValueError
        If a gather is needed but the strides are not whole elements, or the
        array keeps more than GATHER_RANK dimensions after merging; the
        message starts with ``name``.  Raised here, before any launch.
    """

    def __init__(self, array: Any, order: Sequence[int], name: str) -> None:
        self.array = array
        shape = tuple(array.shape)
        self.size = math.prod(shape)
        itemsize = np.dtype(array.dtype).itemsize
        strides = byte_strides(array)
        self.contiguous = _layout.is_contiguous_in(shape, strides, itemsize, order)
        if self.contiguous:
            return
        if any(s % itemsize for s in strides):
            raise ValueError(f"{name}: strides {strides} are not multiples of the item size {itemsize}")
        # Keep the dimensions in the target order, drop extent-1 ones, merge
        # neighbours that are contiguous with each other: fewer dimensions
        # for the gather kernel to divide the index by.
        dims = [(shape[d], strides[d] // itemsize) for d in order if shape[d] != 1]
        merged: list[tuple[int, int]] = []
        for extent, stride in dims:
            if merged and merged[-1][1] == stride * extent:
                merged[-1] = (merged[-1][0] * extent, stride)
            else:
                merged.append((extent, stride))
        if len(merged) > GATHER_RANK:
            raise ValueError(
                f"{name}: a non-contiguous GPU array with more than {GATHER_RANK} dimensions that cannot be "
                "merged is not supported; make it contiguous first"
            )
        padding = [(1, 0)] * (GATHER_RANK - len(merged))
        self.shape = tuple(int(e) for e, _ in padding + merged)
        self.element_strides = tuple(int(s) for _, s in padding + merged)
        # Lowest and highest element the array touches, relative to element [0, ..., 0].
        self.low = sum(min(0, s * (e - 1)) for e, s in merged)
        self.high = sum(max(0, s * (e - 1)) for e, s in merged)

    def flat(self) -> Any:
        """The contiguous 1-D array of the elements in this order (launches a gather if needed)."""
        itemsize = np.dtype(self.array.dtype).itemsize
        if self.contiguous:
            return target.view(self.array, (self.size,), (itemsize,))
        span = target.view(self.array, (self.high - self.low + 1,), (itemsize,), self.low * itemsize)
        destination = context.device_array(self.size, self.array.dtype)
        gather_flat(span, -self.low, self.shape, self.element_strides, destination)
        return destination


class Layout:
    """The kernel layout of an input ``x``: ROWS (channels-last order) or SLAB (C order).

    The rule is :func:`fastbn._layout.pattern`'s: ROWS if x is contiguous in
    channels-last order, else SLAB if it is C-contiguous.  Any other x is
    gathered into C order: SLAB, or ROWS when every axis after the channel
    axis has extent 1 (``inner == 1``), where the two orders are the same.

    Attributes
    ----------
    rows : bool
        ROWS (True) or SLAB.
    outer, channels, inner : int
        The kernel shape ``(outer, C, inner)``; for ROWS, ``outer`` is the
        number of rows and ``inner`` is 1.
    order : list of int
        x's dimensions in the layout's memory order, slowest first.
    x_access : FlatAccess
        How x reaches the kernels.
    """

    def __init__(self, x: Any, axis: int) -> None:
        shape = tuple(x.shape)
        self.shape = shape
        self.axis = axis
        itemsize = np.dtype(x.dtype).itemsize
        kind = _layout.pattern(shape, byte_strides(x), itemsize, axis)
        if kind is None:
            kind = _layout.fallback(shape, axis)
        self.rows = kind == _layout.ROWS
        self.order = _layout.order(kind, len(shape), axis)
        self.channels = shape[axis]
        if self.rows:
            self.outer, _ = _layout.kernel_shape(kind, shape, axis)
            self.inner = 1
        else:
            self.outer, _, self.inner = _layout.kernel_shape(kind, shape, axis)
        self.x_access = FlatAccess(x, self.order, "x")

    def same(self, array: Any, name: str) -> FlatAccess:
        """How ``array`` (shaped like x) reaches the kernels in this layout's order."""
        return FlatAccess(array, self.order, name)

    def empty(self, dtype: npt.DTypeLike) -> tuple[Any, Any]:
        """An output shaped like x in this layout's memory order, and its flat view."""
        itemsize = np.dtype(dtype).itemsize
        flat = context.device_array(math.prod(self.shape), dtype)
        ordered_strides = target.c_strides(tuple(self.shape[d] for d in self.order), itemsize)
        strides = [0] * len(self.shape)
        for position, d in enumerate(self.order):
            strides[d] = ordered_strides[position]
        return target.view(flat, self.shape, tuple(strides)), flat


def vector(array: Any, name: str) -> FlatAccess:
    """How a statistics array, (C,) or ghost batch norm's (G, C), reaches the kernels as a flat 1-D input."""
    return FlatAccess(array, list(range(len(array.shape))), name)


def grouped(flat: Any, groups: int, channels: int) -> Any:
    """A flat (G C,) result as the (G, C) array of ghost batch norm; as it is when G = 1."""
    if groups == 1:
        return flat
    itemsize = np.dtype(flat.dtype).itemsize
    return target.view(flat, (groups, channels), (channels * itemsize, itemsize))


def split(buffer: Any, channels: int, *counts: int) -> list[Any]:
    """Consecutive 1-D slices of ``buffer``, the k-th ``counts[k] * channels`` long.

    One allocation for all of a call's per-channel arrays: a device
    allocation costs far more than slicing it.
    """
    pieces = []
    start = 0
    for count in counts:
        pieces.append(buffer[start : start + count * channels])
        start += count * channels
    return pieces
