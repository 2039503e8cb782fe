"""How a caller's array becomes a CPU kernel input, and how outputs are made.

Host arrays in, the caller's kind out.  The CPU kernels compute on NumPy
arrays; :func:`to_host` turns an argument into one, without copying wherever
the framework allows it, and :func:`restorer` turns NumPy results back into
the kind of array the caller passed in:

=====================  ===================================  ====================
caller's array         becomes (to_host)                    results come back as
=====================  ===================================  ====================
numpy.ndarray          itself                               numpy.ndarray
torch.Tensor (CPU)     ``tensor.detach().numpy()``: a view  torch.Tensor (a view)
jax.Array (CPU)        ``np.asarray``: a read-only view     jax.Array
``__dlpack__`` (CPU)   ``np.from_dlpack``: a view           numpy.ndarray
anything else          ``np.asarray`` (may copy)            numpy.ndarray
=====================  ===================================  ====================

Because a torch tensor becomes a writable view of its own memory, torch
running statistics are updated in place.  The functional API records no
autograd history (results are plain tensors); :mod:`fastbn.torch` does.  A
JAX array is immutable: its view is read-only, so fastbn's check on running
statistics rejects it (use :func:`fastbn.jax.batch_norm`, which returns new
ones).  Frameworks are recognised by :mod:`fastbn._frameworks`.

NumPy has no bfloat16; fastbn uses ml_dtypes' (JAX's, so a JAX bfloat16
array comes in as it is).  A bfloat16 tensor, which ``numpy()`` refuses, is
viewed as int16 and then as that dtype, and bfloat16 results go back to
torch the same way round: views both ways, strides kept.

Then :func:`channel_view` views a validated input in the layout of
:mod:`fastbn._layout` (a view, or one copy into C order for other strides),
and :func:`empty_like_layout` allocates an output in that layout's memory
order from the output pool (:mod:`fastbn.backends.cpu.alloc`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fastbn._frameworks import framework_of
from fastbn._layout import ROWS, SLAB, fallback, kernel_shape, pattern
from fastbn._validate import is_bfloat16
from fastbn.backends.cpu import alloc

__all__ = [
    "ROWS",
    "SLAB",
    "channel_view",
    "cow_view",
    "empty_like_layout",
    "readonly",
    "restorer",
    "same_view",
    "to_host",
    "vector",
]

# Arguments that fastbn writes into (running statistics must be writable).
_UPDATED_IN_PLACE = ("running_mean", "running_var")

# DLPack's device code for host memory (``__dlpack_device__()[0]``).
_DLPACK_CPU = 1


def _torch_to_numpy(tensor: Any, name: str, updated: bool | None = None) -> npt.NDArray[Any]:
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu":
        raise ValueError(
            f"{name}: is a torch tensor on device '{tensor.device}'; fastbn takes CPU tensors "
            "(and CUDA tensors, on its CUDA backend)"
        )
    if tensor.layout != torch.strided:
        # Sparse and other layouts have no strided memory to view (nor to update in place).
        raise TypeError(f"{name}: a torch tensor of layout {tensor.layout}; fastbn takes dense (torch.strided) tensors")
    updated = name in _UPDATED_IN_PLACE if updated is None else updated
    if updated and tensor.numel() > 1 and 0 in tensor.stride():
        # An expanded tensor repeats one element: writing each channel into it
        # would leave the last channel's value everywhere.
        raise ValueError(f"{name}: must not be an expanded (stride 0) tensor, it is updated in place")
    if tensor.is_neg() and not updated:
        # A lazily negated view (torch._neg_view, some conj paths) has no
        # NumPy view of its values; an input that is only read is resolved
        # to a copy, while running statistics must stay the caller's memory.
        tensor = tensor.detach().resolve_neg()
    if not updated and tensor.layout == torch.strided and torch._C._is_cow_tensor(tensor):
        return cow_view(tensor)  # after resolve_neg above: a negated view's raw memory is not its values
    try:
        # detach() shares memory and drops requires_grad, which numpy() refuses;
        # numpy() keeps the tensor's strides (channels_last included).
        if tensor.dtype == torch.bfloat16:
            return bfloat16_numpy(tensor)
        return cast(npt.NDArray[Any], tensor.detach().numpy())
    except (RuntimeError, TypeError) as exc:  # sparse, quantized, conj/neg views
        raise TypeError(f"{name}: this torch tensor cannot be viewed as a NumPy array ({exc})") from None


class _ConstBuffer:
    """A copy-on-write tensor's memory as NumPy's array interface, read-only (the view's base).

    It keeps the memory alive through a copy-on-write clone of its own
    (``torch._lazy_clone``), not through the caller's tensor: asking that one
    for writable memory later (``data_ptr()``, ``numpy()``) gives it a copy,
    and the shared memory would then live only as long as its other owners;
    the private clone, which nothing writes, holds it, unchanged, as long as
    the view lives (a saved input read again in backward).
    """

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, tensor: Any, typestr: str) -> None:
        torch = sys.modules["torch"]
        self.owner = tensor = torch._lazy_clone(tensor.detach())
        itemsize = tensor.element_size()
        self.__array_interface__ = {
            "shape": tuple(tensor.shape),
            "typestr": typestr,
            # const_data_ptr: the address without claiming write access, which
            # would make torch copy a copy-on-write tensor's shared memory.
            "data": (tensor.const_data_ptr(), True),
            "strides": tuple(stride * itemsize for stride in tensor.stride()),
            "version": 3,
        }


def cow_view(tensor: Any) -> npt.NDArray[Any]:
    """A read-only NumPy view of a CPU tensor that leaves a copy-on-write tensor shared.

    ``tensor.numpy()`` (like ``data_ptr()``, ``__array__`` and DLPack) asks
    torch for writable memory, and a copy-on-write tensor (``torch._lazy_clone``,
    what some torch operations return) answers by copying it, its sharing
    lost: torch's own operators read such inputs without that copy, and so
    does fastbn, through the address for reading.  The view is read-only,
    which the kernels' inputs are anyway (:func:`readonly`, :func:`vector`).
    For inputs only: running statistics that fastbn updates take the
    writable path, and torch copies them before the write, as it must.
    """
    torch = sys.modules["torch"]
    typestr = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8", torch.bfloat16: "<i2"}.get(
        tensor.dtype
    )
    if typestr is None:  # other dtypes: the ordinary view (validation names what is wrong with them)
        return cast(npt.NDArray[Any], tensor.detach().numpy())
    if tensor.is_neg():  # its memory holds the negated values: a resolved copy (callers resolve it first)
        return readonly(_torch_to_numpy(tensor.detach().resolve_neg(), "tensor"))
    if tensor.numel() == 0:  # no address to view (0); nothing to copy either
        empty = np.empty(tuple(tensor.shape), np.dtype(typestr))
        return readonly(empty.view(bfloat16()) if tensor.dtype == torch.bfloat16 else empty)
    view = np.asarray(_ConstBuffer(tensor, typestr))
    return cast(npt.NDArray[Any], view.view(bfloat16()) if tensor.dtype == torch.bfloat16 else view)


def _jax_to_numpy(array: Any, name: str) -> npt.NDArray[Any]:
    jax = sys.modules["jax"]
    try:
        # A read-only view of the host buffer of a CPU array (a copy for an
        # array on an accelerator).
        return np.asarray(array)
    except jax.errors.TracerArrayConversionError:
        raise TypeError(
            f"{name}: is a traced JAX value (inside jax.jit, jax.grad, ...); fastbn.forward and "
            "friends need concrete arrays, use fastbn.jax.batch_norm under JAX transformations"
        ) from None
    except Exception as exc:
        raise TypeError(f"{name}: this JAX array cannot be read as a NumPy array ({exc})") from None


def _from_dlpack(obj: Any) -> npt.NDArray[Any] | None:
    """np.from_dlpack(obj) for a host DLPack exporter, or None to fall back to np.asarray."""
    try:
        device_type = obj.__dlpack_device__()[0]
    except Exception:
        return None
    if device_type != _DLPACK_CPU:
        return None
    try:
        return np.from_dlpack(obj)
    except Exception:
        return None


def to_host(obj: Any, name: str, *, read_only: bool = False) -> npt.NDArray[Any] | None:
    """Return ``obj`` as a NumPy array (``None`` stays ``None``).

    Parameters
    ----------
    obj : object
        A NumPy array (passed through), a CPU torch tensor, a JAX array, an
        object exposing ``__dlpack__`` or ``__array__``, or a nested sequence.
    name : str
        The argument's name, for error messages.
    read_only : bool, default False
        The call only reads ``obj``, even if it is a running statistic
        (``fold``): it may then be converted (a list, an ``__array__`` object)
        as any other input; otherwise running statistics must be memory that
        fastbn can update.

    Returns
    -------
    numpy.ndarray or None
        A view of ``obj``'s memory wherever the framework allows one: always
        for NumPy, torch and CPU JAX arrays and for host DLPack exporters, so
        torch running statistics are updated in place.

    Raises
    ------
    TypeError
        If ``obj`` cannot be read as an array (traced JAX values, sparse
        tensors, strings, ...); the message starts with ``name``.
    ValueError
        If ``obj`` is a torch tensor on a device fastbn does not run on.
    """
    if obj is None:
        return None
    updated = name in _UPDATED_IN_PLACE and not read_only
    if isinstance(obj, np.ndarray):
        if isinstance(obj, np.ma.MaskedArray):
            raise TypeError(
                f"{name}: is a masked array, whose mask fastbn would ignore; pass a plain array "
                "(e.g. array.filled(value)), or the unmasked values"
            )
        # np.matrix and other subclasses: a plain view of the same memory.
        return obj if type(obj) is np.ndarray else obj.view(np.ndarray)
    kind = framework_of(obj)
    if kind == "torch":
        return _torch_to_numpy(obj, name, updated)
    if kind == "jax":
        if updated:
            raise ValueError(
                f"{name}: is a JAX array, which is immutable, but running statistics are updated in "
                "place; pass NumPy arrays, or use fastbn.jax.batch_norm, which returns new ones"
            )
        return _jax_to_numpy(obj, name)
    if isinstance(obj, (str, bytes, dict, set)):
        raise TypeError(f"{name}: expected an array, got {type(obj).__name__}")
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        array = _from_dlpack(obj)
        if array is not None:
            return array
    if updated:
        # np.asarray may copy a list, a tuple or an __array__ object: the update would go into the copy.
        raise TypeError(
            f"{name}: expected a NumPy array or a CPU torch tensor, which fastbn updates in place, "
            f"got {type(obj).__name__} (converting it would update a copy and lose the update)"
        )
    try:
        return np.asarray(obj)
    except Exception as exc:
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None


def bfloat16_numpy(tensor: Any) -> npt.NDArray[Any]:
    """A NumPy view of a bfloat16 CPU tensor's memory, as ml_dtypes' bfloat16 (:func:`to_torch` the way back).

    ``numpy()`` refuses bfloat16 (NumPy has no such dtype of its own): the
    same 16 bits are viewed as int16, then as ml_dtypes' bfloat16, with no copy.
    """
    torch = sys.modules["torch"]
    return cast(npt.NDArray[Any], tensor.detach().view(torch.int16).numpy().view(bfloat16()))


def to_torch(array: npt.NDArray[Any]) -> Any:
    # from_numpy shares memory with the fresh result and keeps its strides,
    # so channels_last input gives a channels_last tensor.
    torch = sys.modules["torch"]
    if is_bfloat16(array.dtype):
        # from_numpy refuses ml_dtypes' bfloat16: the same bits as int16, viewed back.
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _jax_restorer(like: Any) -> Callable[[npt.NDArray[Any]], Any]:
    jax = sys.modules["jax"]
    try:
        # A committed array pins its results to its device; an uncommitted
        # one leaves JAX free to place them, as for any new array.
        device = next(iter(like.devices())) if getattr(like, "committed", False) else None
    except Exception:
        device = None

    def restore(array: npt.NDArray[Any]) -> Any:
        # device_put aliases a suitably aligned host buffer on the CPU backend
        # instead of copying it.
        return jax.device_put(array, device)

    return restore


def _identity(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return array


def restorer(like: Any) -> Callable[[npt.NDArray[Any]], Any]:
    """Return a function that turns NumPy results into the kind of ``like``.

    Parameters
    ----------
    like : object
        The call's first array argument (``x`` or ``dy``), as the caller
        passed it.

    Returns
    -------
    callable
        ``numpy.ndarray -> torch.Tensor`` (sharing memory) for a torch
        tensor, ``-> jax.Array`` (on ``like``'s device when it is committed
        to one) for a JAX array, and the identity for anything else: NumPy in,
        NumPy out.
    """
    if like is None or isinstance(like, np.ndarray):
        return _identity
    kind = framework_of(like)
    if kind == "torch":
        return to_torch
    if kind == "jax":
        return _jax_restorer(like)
    return _identity


# ------------------------------------------------------------ kernel views ---
def bfloat16() -> np.dtype[Any]:
    """ml_dtypes' bfloat16 dtype, imported on first use (``import fastbn`` does not import ml_dtypes)."""
    import ml_dtypes

    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dtype


def as_kernel_dtype(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array``, float16 reinterpreted as uint16 and bfloat16 as int16: Numba's CPU target has neither.

    Two distinct integer types, so that the kernels' loads and stores
    (:mod:`fastbn.backends.cpu.loops`) specialise on which half type it is.
    """
    if array.dtype == np.float16:
        return array.view(np.uint16)
    return array.view(np.int16) if is_bfloat16(array.dtype) else array


def readonly(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only view of ``array``, for a kernel input.

    Numba compiles a separate specialisation for read-only arrays (JAX hands
    out read-only buffers); marking every kernel input read-only means one
    compilation serves NumPy, torch and JAX callers alike.
    """
    view: npt.NDArray[Any] = array.view()
    view.flags.writeable = False
    return view


def vector(array: Any) -> npt.NDArray[Any]:
    """A per-channel kernel input (weight, bias, a mean, an invstd) as a contiguous, writable array.

    The opposite choice to :func:`readonly`, for the same reason: Numba
    compiles a separate specialisation per combination of read-only and
    writable arguments, and a kernel takes up to five per-channel inputs,
    which callers hand over writable (NumPy) or read-only (JAX, a frozen
    array) as they please; every combination would cost a compilation of
    seconds.  Most are writable already, and a read-only one is copied: a
    few channels' worth.  The kernels never write to these.
    """
    out = np.ascontiguousarray(array)
    return out if out.flags.writeable else out.copy()


def channel_view(x: npt.NDArray[Any], axis: int) -> tuple[str, npt.NDArray[Any]]:
    """View ``x`` as the kernels' 2-D ROWS or 3-D SLAB shape.

    Parameters
    ----------
    x : numpy.ndarray
        Floating array, already validated.
    axis : int
        Non-negative channel axis.

    Returns
    -------
    layout : str
        ``ROWS`` or ``SLAB`` (:func:`fastbn._layout.pattern`).
    view : numpy.ndarray
        A read-only C-contiguous view of ``x`` (of a copy, if ``x`` was not
        contiguous in either pattern), float16 reinterpreted as uint16 and
        bfloat16 as int16.
    """
    layout = pattern(x.shape, x.strides, x.itemsize, axis)
    if layout is None:
        layout = fallback(x.shape, axis)
        x = np.ascontiguousarray(x)
    return layout, readonly(same_view(layout, x, axis))


def same_view(layout: str, a: npt.NDArray[Any], axis: int) -> npt.NDArray[Any]:
    """View ``a`` (shaped like the array that gave ``layout``) in that layout.

    Used for ``dy`` in backward, which must be walked in the same order as
    ``x``, and for outputs; copies only when ``a`` is not contiguous in that
    order.  The view is writable: callers mark inputs with :func:`readonly`.
    """
    shape = kernel_shape(layout, a.shape, axis)
    # np.moveaxis costs microseconds of argument normalisation: skip it where it is the identity.
    in_order = np.moveaxis(a, axis, -1) if layout == ROWS and axis != a.ndim - 1 else a
    return as_kernel_dtype(np.ascontiguousarray(in_order).reshape(shape))


def empty_like_layout(layout: str, x: npt.NDArray[Any], axis: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any], bool]:
    """Allocate an output shaped like ``x``, in the memory order of ``layout``.

    The memory comes from the output pool (:func:`fastbn.backends.cpu.alloc.allocate`):
    a large output reuses the already paged-in memory of a dead one, instead
    of a fresh mapping whose every page the OS must zero on first write.

    Returns
    -------
    out : numpy.ndarray
        The array to hand back to the caller (channels-last input gives a
        channels-last output).
    view : numpy.ndarray
        Its kernel view, in the same layout as the input's.
    fresh : bool
        Whether the memory is freshly mapped (the plan writes it in memory order).
    """
    if layout == ROWS:
        moved_shape = x.shape[:axis] + x.shape[axis + 1 :] + (x.shape[axis],)
        moved, fresh = alloc.allocate(moved_shape, x.dtype)
        out = moved if axis == x.ndim - 1 else np.moveaxis(moved, -1, axis)
    else:
        out, fresh = alloc.allocate(x.shape, x.dtype)
    return out, same_view(layout, out, axis), fresh
