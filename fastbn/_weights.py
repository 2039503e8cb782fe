"""The TensorFlow-style arguments of the public functions: reduction axes, weights, masks, broadcast parameters.

fastbn's own convention names one channel axis and takes ``(C,)`` parameters
(PyTorch's).  TensorFlow names the reduction axes instead (``tf.nn.moments(x,
axes, keepdims)``), weighs the batch (``tf.nn.weighted_moments``), and, as
Keras and Flax, masks positions out of the statistics; its parameters are any
shape that broadcasts to x.  This module turns those forms into the channel
form the kernels take, checking each argument first.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastbn._validate import _describe

__all__ = ["channel_parameter", "check_weights", "reduction_axes"]


def reduction_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    """``axes`` (an int or a sequence of ints, TensorFlow's reduction axes) as sorted non-negative axes.

    Raises
    ------
    TypeError
        For anything but integers.
    ValueError
        For an axis out of range, or one given twice.
    """
    if isinstance(axes, (str, bytes)):
        raise TypeError(f"axes: expected an int or a sequence of ints, got {_describe(axes)}")
    items = list(axes) if isinstance(axes, (Sequence, np.ndarray)) else [axes]
    resolved = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise TypeError(f"axes: expected integers, got {item!r}")
        try:
            index = operator.index(item)
        except TypeError:
            raise TypeError(f"axes: expected an int or a sequence of ints, got {_describe(axes)}") from None
        if not -ndim <= index < ndim:
            raise ValueError(f"axes: axis {index} is out of range for an input of rank {ndim}")
        resolved.append(index % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"axes: an axis is given twice in {axes!r}")
    return tuple(sorted(resolved))


def check_weights(weights: Any, mask: Any, shape: tuple[int, ...], axis: int | None, dtype: np.dtype) -> Any:
    """The statistics' weights as a C-contiguous array of ``shape`` in ``dtype``, or None for none.

    Parameters
    ----------
    weights : numpy.ndarray or None
        Non-negative finite numbers, broadcastable to ``shape``.
    mask : numpy.ndarray or None
        Booleans, broadcastable to ``shape`` or, when ``axis`` is given, of
        ``shape`` without the channel axis (Keras's mask of a ``(N, T, C)``
        batch is ``(N, T)``); True keeps a position in the statistics.
    shape : tuple of int
        The input's shape.
    axis : int or None
        The (non-negative) channel axis, or None when reduction axes were named.
    dtype : numpy.dtype
        The statistics dtype (the weights are summed in float64 by the kernels).

    Raises
    ------
    TypeError, ValueError
        Naming ``weights`` or ``mask``: both given, a mask that is not boolean,
        weights that are not real numbers, negative or not finite, a shape
        that does not broadcast.
    """
    if weights is None and mask is None:
        return None
    if weights is not None and mask is not None:
        raise ValueError("weights, mask: give one or the other (a mask is 0/1 weights)")
    name, value = ("mask", mask) if mask is not None else ("weights", weights)
    array = np.asarray(value)
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name}: is a masked array; pass a plain array")
    if name == "mask":
        if array.dtype != np.bool_:
            raise TypeError(
                f"mask: expected booleans (True keeps a position in the statistics), got dtype {array.dtype}"
            )
        if axis is not None and array.ndim == len(shape) - 1:
            array = np.expand_dims(array, axis)  # Keras's form: the input's shape without the channel axis
    elif array.dtype.kind not in "biuf" and str(array.dtype) != "bfloat16":
        raise TypeError(f"weights: expected real numbers, got dtype {array.dtype}")
    try:
        full = np.broadcast_to(array, shape)
    except ValueError:
        expected = f"{shape}" + ("" if name == "weights" or axis is None else f" or {shape[:axis] + shape[axis + 1 :]}")
        raise ValueError(f"{name}: expected a shape that broadcasts to {expected}, got {array.shape}") from None
    if name == "weights" and array.size:
        low = np.min(array)
        if not np.all(np.isfinite(array)) or low < 0:
            raise ValueError("weights: expected finite non-negative numbers" + (f", got {low}" if low < 0 else ""))
    with np.errstate(over="ignore", under="ignore"):
        converted = np.ascontiguousarray(full, dtype=dtype)
    if name == "weights" and array.size:
        # The kernels take the weights in the statistics dtype: a weight beyond its range would become inf
        # (NaN statistics), a positive one below it 0 (a position dropped, or a batch of zero total weight).
        # The statistics do not depend on the weights' scale, so the caller can rescale them.
        lost = ~np.isfinite(converted) | ((converted == 0) & (full != 0))
        if lost.any():
            value = float(full[lost].flat[0])
            raise ValueError(
                f"weights: {value:g} is outside the range of {np.dtype(dtype)}, the dtype the statistics "
                f"(and the weights) are computed in; rescale the weights (the statistics do not depend on "
                f"their scale), e.g. weights / weights.max()"
            )
        # The kernels multiply the weights by the values in float64: a positive weight below float64's
        # smallest normal number (2.2e-308) loses its significand in those products, silently (equal weights
        # of 5e-324 gave statistics far from the unweighted ones).  Only float64 weights can be that small.
        if converted.dtype == np.float64 and bool(np.any((converted > 0) & (converted < _SMALLEST_WEIGHT))):
            raise ValueError(
                f"weights: positive weights below {_SMALLEST_WEIGHT:.3g} (float64's smallest normal number) lose "
                "precision in the statistics' products; rescale the weights (the statistics do not depend on "
                "their scale), e.g. weights / weights.max()"
            )
        # The kernels sum the weights (and weights times values) in float64: a total beyond its range makes
        # a channel's sum inf (a mean of NaN or 0, a NaN running variance).  Every channel's sum is at most
        # the total, and its rounded partial sums at most the total times 1 + n u, so a total within a
        # quarter of float64's range keeps them all finite.
        with np.errstate(over="ignore"):
            total = float(np.sum(converted, dtype=np.float64))
        if not total <= _MAX_TOTAL_WEIGHT:
            shown = "more than 1.8e308" if total == np.inf else f"{total:g}"
            raise ValueError(
                f"weights: sum to {shown}, beyond the {_MAX_TOTAL_WEIGHT:.3g} the statistics' float64 sums hold; "
                "rescale the weights (the statistics do not depend on their scale), e.g. weights / weights.max()"
            )
    return converted


#: The smallest positive weight :func:`check_weights` admits: float64's smallest normal number.
_SMALLEST_WEIGHT = float(np.finfo(np.float64).tiny)
#: The largest total of the weights :func:`check_weights` admits: a quarter of float64's range.
_MAX_TOTAL_WEIGHT = float(np.finfo(np.float64).max) / 4


def channel_parameter(value: Any, name: str, shape: tuple[int, ...], axis: int, dtype: np.dtype) -> Any:
    """A per-channel parameter of :func:`fastbn.normalize` as a ``(C,)`` array of ``dtype``.

    ``(C,)`` is per channel whatever the channel axis (fastbn's and PyTorch's
    form); any other shape follows NumPy's broadcasting against the input and
    may vary along the channel axis only: ``(1, 1, 1, C)`` for NHWC, ``(C, 1,
    1)`` or ``(1, C, 1, 1)`` for NCHW, moments' ``keepdims`` results, a scalar.
    Any floating dtype; the value is rounded to the statistics dtype.
    """
    channels = shape[axis]
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "shape"):
        raise TypeError(
            f"{name}: expected an array of shape ({channels},) or broadcastable to {shape}, got {_describe(value)}"
        )
    array = np.asarray(value)
    if array.dtype.kind != "f" and str(array.dtype) != "bfloat16":
        raise TypeError(f"{name}: expected a floating array, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # beyond the statistics dtype's range rounds to +-inf, as a cast does
        if array.shape == (channels,):
            return np.ascontiguousarray(array, dtype=dtype)
    padded = (1,) * (len(shape) - array.ndim) + tuple(array.shape)
    fits = array.ndim <= len(shape) and all(n == 1 or (i == axis and n == channels) for i, n in enumerate(padded))
    if not fits:
        raise ValueError(
            f"{name}: expected shape ({channels},) or one that broadcasts to {shape} and varies only along "
            f"the channel axis {axis}, got {array.shape}"
        )
    per_channel = array.reshape(padded[axis]) if padded[axis] == channels else np.full(channels, array.reshape(()))
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(per_channel, dtype=dtype)


def kept_shape(shape: tuple[int, ...], reduced: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    """The shape of moments' results: the kept axes, or ``shape`` with the reduced axes as 1."""
    if keepdims:
        return tuple(1 if i in reduced else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in reduced)


def as_rows(array: Any, reduced: tuple[int, ...]) -> Any:
    """``array`` with its kept axes moved last and flattened: ``(reduced elements, kept elements)``."""
    kept = [i for i in range(array.ndim) if i not in reduced]
    moved = np.moveaxis(array, kept, list(range(array.ndim - len(kept), array.ndim)))
    return moved.reshape(math.prod(array.shape[i] for i in reduced), math.prod(array.shape[i] for i in kept))
