"""Array argument checks.  Every public function runs all of them before any kernel.

The scalar options and their combinations are checked in :mod:`fastbn._options`.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
value or shape) with a message that starts with the argument's name, so that a
failed call leaves every buffer, running statistics above all, untouched.
"""

from __future__ import annotations

import math
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def stats_dtype(dtype):
    """The dtype of statistics and parameters for input of ``dtype``.

    float16 input keeps float32 statistics and parameters (as PyTorch does on
    CPU): half precision overflows at 65504 and resolves only 11 bits.
    """
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__}"


def _is_array(value):
    return hasattr(value, "dtype") and hasattr(value, "shape")


def check_x(x, name="x"):
    """Check that ``x`` is a float16/32/64 array of rank >= 2 and return it.

    ``x`` is a NumPy array or a GPU array (anything with ``dtype`` and
    ``shape``), already converted by the dispatcher.
    """
    if not _is_array(x):
        raise TypeError(f"{name}: expected a float16, float32 or float64 array, got {_describe(x)}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {x.dtype}")
    if len(x.shape) < 2:
        raise ValueError(
            f"{name}: expected at least 2 dimensions (batch and channel), got shape {tuple(x.shape)}"
        )
    return x


def check_axis(axis, ndim, name="axis"):
    """Return ``axis`` normalised to ``0 <= axis < ndim``, or raise."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array of {ndim} dimensions")
    return axis % ndim


def check_channels(x, axis, name="x", allow_empty=False):
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


def check_channel_vector(value, name, channels, dtype, *, writable=False):
    """Check a per-channel array: ndarray, shape (C,), exactly ``dtype``."""
    if not _is_array(value):
        raise TypeError(
            f"{name}: expected an array of dtype {dtype} and shape ({channels},), "
            f"got {_describe(value)}"
        )
    if np.dtype(value.dtype) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (to match the input), got {value.dtype}")
    if tuple(value.shape) != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},), got {tuple(value.shape)}")
    if writable and not getattr(getattr(value, "flags", None), "writeable", True):
        raise ValueError(f"{name}: must be writable, it is updated in place")
    return value


def check_running(running_mean, running_var, channels, dtype):
    """Check the running-statistics pair; return True if it was given."""
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(
            f"{missing}: running_mean and running_var must be given together, got only one"
        )
    if running_mean is None:
        return False
    check_channel_vector(running_mean, "running_mean", channels, dtype, writable=True)
    check_channel_vector(running_var, "running_var", channels, dtype, writable=True)
    if (
        isinstance(running_mean, np.ndarray)
        and isinstance(running_var, np.ndarray)
        and np.shares_memory(running_mean, running_var)
    ):
        raise ValueError("running_var: must not share memory with running_mean")
    return True


def check_like_x(value, name, x):
    """Check an array that must match ``x`` in shape and dtype (residual, forward's output)."""
    if not _is_array(value):
        raise TypeError(
            f"{name}: expected an array of dtype {x.dtype} and shape {tuple(x.shape)} like x, got {_describe(value)}"
        )
    if tuple(value.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(value.shape)}")
    if np.dtype(value.dtype) != np.dtype(x.dtype):
        raise TypeError(f"{name}: expected the dtype of x ({x.dtype}), got {value.dtype}")
    return value
