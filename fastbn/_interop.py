"""Host arrays in, the caller's kind out.

fastbn computes on NumPy arrays.  This module turns a host argument into one
(without copying where possible) and gives back results of the kind the caller
passed in.
"""

from __future__ import annotations

import numpy as np


def to_host(obj, name):
    """Return ``obj`` as a NumPy array (``None`` stays ``None``).

    NumPy arrays pass through unchanged, so running statistics are updated in
    place.  Anything else NumPy can read (lists, objects with ``__array__``)
    is converted; conversion errors name the argument.
    """
    if obj is None or isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, (str, bytes, dict, set)):
        raise TypeError(f"{name}: expected an array, got {type(obj).__name__}")
    try:
        return np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None


def restorer(like):
    """Return a function that turns NumPy results into the kind of ``like``."""
    del like  # NumPy in, NumPy out
    return lambda array: array
