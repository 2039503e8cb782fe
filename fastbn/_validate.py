"""Array argument checks.  Every public function runs all of them before any kernel.

The scalar options and their combinations are checked in :mod:`fastbn._options`.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
value or shape) with a message that starts with the argument's name, so that a
failed call leaves every buffer, running statistics above all, untouched.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from fastbn._layout import c_strides

_T = TypeVar("_T")

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: The input dtypes, as error messages name them.
FLOAT_NAMES = "float16, bfloat16, float32 or float64"


_IS_BFLOAT16: dict[Any, bool] = {}


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is bfloat16 (ml_dtypes' NumPy dtype, which JAX uses too).

    Recognised by name, so that ``import fastbn`` need not import ml_dtypes:
    a bfloat16 array can only exist once something has registered the dtype.
    The answer is kept per dtype: NumPy builds ``dtype.name`` anew on every
    read (microseconds, several times a call).
    """
    known = _IS_BFLOAT16.get(dtype)
    if known is None:
        known = _IS_BFLOAT16[dtype] = getattr(dtype, "name", None) == "bfloat16"
    return known


def stats_dtype(dtype: Any) -> np.dtype[Any]:
    """The dtype of statistics and parameters for input of ``dtype``.

    float16 and bfloat16 input keep float32 statistics and parameters (as
    PyTorch does on CPU): half precision overflows at 65504 and resolves only
    11 bits, bfloat16 has float32's range but resolves only 8.
    """
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__}"


def _is_array(value: object) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "shape")


def check_x(x: _T, name: str = "x", min_rank: int = 2) -> _T:
    """Check that ``x`` is a float16, bfloat16, float32 or float64 array of rank >= ``min_rank`` and return it.

    ``x`` is a NumPy array or a GPU array (anything with ``dtype`` and
    ``shape``), already converted by the dispatcher.
    """
    if not _is_array(x):
        raise TypeError(f"{name}: expected a {FLOAT_NAMES} array, got {_describe(x)}")
    array: Any = x
    dtype = np.dtype(array.dtype)
    if dtype not in FLOAT_DTYPES and not is_bfloat16(dtype):
        raise TypeError(f"{name}: expected dtype {FLOAT_NAMES}, got {array.dtype}")
    if len(array.shape) < min_rank:
        what = "2 dimensions (batch and channel)" if min_rank == 2 else f"{min_rank} dimension"
        raise ValueError(f"{name}: expected at least {what}, got shape {tuple(array.shape)}")
    return x


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` normalised to ``0 <= axis < ndim``, or raise."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got bool")
    try:
        index = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(axis).__name__}") from None
    if not -ndim <= index < ndim:
        raise ValueError(f"{name}: {index} is out of range for an array of {ndim} dimensions")
    return index % ndim


def check_channels(x: Any, axis: int, name: str = "x", allow_empty: bool = False) -> tuple[int, int]:
    """Return (C, elements per channel); reject arrays with no elements.

    ``allow_empty`` admits a batch of zero elements: in synchronised batch
    norm one process may hold none of the global batch.
    """
    shape = tuple(x.shape)
    channels = shape[axis]
    if channels == 0:
        raise ValueError(f"{name}: the channel axis {axis} has length 0 in shape {shape}")
    count = math.prod(shape) // channels
    if count == 0 and not allow_empty:
        raise ValueError(f"{name}: empty batch, shape {shape} has no elements per channel")
    return channels, count


def _read_only(value: Any) -> bool:
    """Whether a host array's flags, or a device array's CUDA array interface, mark it read-only."""
    if isinstance(value, np.ndarray):
        return not value.flags.writeable
    interface = getattr(value, "__cuda_array_interface__", None)
    return bool(interface and interface["data"][1])


def _dtype_of(value: Any, name: str, expected: object) -> np.dtype[Any]:
    """``np.dtype(value.dtype)``, or a TypeError naming the argument where NumPy cannot read it.

    Arrays reach the checks converted by the backend, except the fields of a
    ``Saved``, which may hold anything (a torch tensor's dtype is no NumPy dtype).
    """
    try:
        dtype: np.dtype[Any] = np.dtype(value.dtype)
        return dtype
    except TypeError:
        raise TypeError(
            f"{name}: expected an array of dtype {expected}, got {type(value).__name__} of dtype {value.dtype}"
        ) from None


def check_channel_vector(
    value: Any, name: str, channels: int, dtype: Any, *, writable: bool = False, rows: int | None = None
) -> Any:
    """Check a per-channel array: ndarray, shape (C,), exactly ``dtype``.

    ``rows``: a ``(rows, C)`` array instead, one row per ghost batch (a ``Saved``'s statistics).
    """
    shape = (channels,) if rows is None else (rows, channels)
    if not _is_array(value):
        raise TypeError(f"{name}: expected an array of dtype {dtype} and shape {shape}, got {_describe(value)}")
    if isinstance(value, np.ma.MaskedArray):  # the backend refuses these for arguments; Saved fields come here
        raise TypeError(f"{name}: is a masked array, whose mask fastbn would ignore; pass a plain array")
    if _dtype_of(value, name, dtype) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (to match the input), got {value.dtype}")
    if tuple(value.shape) != shape:
        where = "" if rows is None else f" for {rows} ghost batches"
        raise ValueError(f"{name}: expected shape {shape}{where}, got {tuple(value.shape)}")
    if writable and _read_only(value):
        raise ValueError(f"{name}: must be writable, it is updated in place")
    return value


def _strides(array: Any) -> tuple[int, ...]:
    """Byte strides of a host or device array (C order when its interface leaves them out)."""
    if isinstance(array, np.ndarray):
        return array.strides
    interface = getattr(array, "__cuda_array_interface__", None) or {}
    strides = interface.get("strides")
    return c_strides(tuple(array.shape), np.dtype(array.dtype).itemsize) if strides is None else tuple(strides)


def _byte_span(array: Any) -> tuple[int, int]:
    """The bytes ``[low, high)`` a device array touches (from its CUDA array interface)."""
    interface = array.__cuda_array_interface__
    low = high = interface["data"][0]
    for extent, stride in zip(array.shape, _strides(array)):
        low += min(0, stride * (extent - 1))
        high += max(0, stride * (extent - 1))
    return low, high + np.dtype(array.dtype).itemsize


def _overlap(a: Any, b: Any) -> bool:
    """Whether two arrays of the same kind (both host or both device) share memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b) and np.shares_memory(a, b)
    if hasattr(a, "__cuda_array_interface__") and hasattr(b, "__cuda_array_interface__"):
        if math.prod(a.shape) == 0 or math.prod(b.shape) == 0:
            return False
        (a_low, a_high), (b_low, b_high) = _byte_span(a), _byte_span(b)
        return a_low < b_high and b_low < a_high
    return False


def check_running(
    running_mean: Any,
    running_var: Any,
    channels: int,
    dtype: Any,
    others: Sequence[tuple[str, Any]] = (),
    *,
    updated: bool = True,
) -> bool:
    """Check the running-statistics pair; return True if it was given.

    Where they are ``updated`` (training), fastbn writes them in place, so
    each must be the caller's own writable memory, one element per channel:
    not a zero-stride (broadcast or expanded) array, whose channels would
    overwrite each other, and not sharing memory with the other running
    statistic or with any array of ``others`` (``(name, array)`` pairs:
    weight, bias, x, residual), which the update would overwrite.  Where
    they are only read (eval), any array of the right dtype and shape will
    do: a read-only or memory-mapped checkpoint, a broadcast.
    """
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"{missing}: running_mean and running_var must be given together, got only one")
    if running_mean is None:
        return False
    if not updated:
        for name, value in (("running_mean", running_mean), ("running_var", running_var)):
            check_channel_vector(value, name, channels, dtype)
        return True
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        check_channel_vector(value, name, channels, dtype, writable=True)
        if channels > 1 and 0 in _strides(value):
            raise ValueError(
                f"{name}: has stride 0 (a broadcast or expanded array), so its channels would "
                "overwrite each other; it is updated in place, pass an array of its own"
            )
    if _overlap(running_mean, running_var):
        raise ValueError("running_var: must not share memory with running_mean")
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        for other_name, other in others:
            if other is not None and _overlap(value, other):
                raise ValueError(
                    f"{name}: shares memory with {other_name}, which the in-place update would "
                    "overwrite; pass an array of its own"
                )
    return True


def check_variance(value: Any, name: str) -> Any:
    """Refuse negative variances (``var`` of normalize, the running variance read in eval, renorm and fold).

    ``sqrt(var + eps)`` of a negative variance is NaN, silently.  NaN itself
    passes (it propagates as in PyTorch).  Host arrays only: reading a device
    array's values would synchronise the device inside the call.
    """
    if isinstance(value, np.ndarray) and value.size and bool((value < 0).any()):
        channel = int(np.flatnonzero(value < 0)[0])
        raise ValueError(f"{name}: expected non-negative variances, got {value.flat[channel]} for channel {channel}")
    return value


def sequence_conversion(original: object, converted: Any, name: str, others: Iterable[tuple[str, Any]]) -> None:
    """Name ``name`` when NumPy turned a Python list or tuple into float64 beside float32 arrays.

    ``np.asarray`` makes a nested list of floats float64, whatever dtype its
    values came from.  When the call's other arrays are float32 (the
    statistics dtype of float16, bfloat16 and float32 input), the first check
    to notice would blame one of them; the argument to fix is the list.
    ``others`` are ``(name, array)`` pairs, None entries skipped.
    """
    if not isinstance(original, (list, tuple)) or not _is_array(converted):
        return
    if np.dtype(converted.dtype) != np.float64:
        return
    for other_name, other in others:
        try:
            float32 = _is_array(other) and np.dtype(other.dtype) == np.float32
        except TypeError:  # not a NumPy dtype: the checks proper will name it
            float32 = False
        if float32:
            raise TypeError(
                f"{name}: a Python {type(original).__name__} was converted to a float64 array (NumPy's default), "
                f"but {other_name} is float32; pass {name} as an array of {other_name}'s dtype, "
                f"e.g. np.asarray({name}, np.float32)"
            )


def check_like_x(value: Any, name: str, x: Any) -> Any:
    """Check an array that must match ``x`` in shape and dtype (residual, forward's output)."""
    if not _is_array(value):
        raise TypeError(
            f"{name}: expected an array of dtype {x.dtype} and shape {tuple(x.shape)} like x, got {_describe(value)}"
        )
    if tuple(value.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(value.shape)}")
    if _dtype_of(value, name, x.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {value.dtype}")
    return value
