"""Pick the backend for a call and bring its arrays to that backend.

A backend is a module of operations with the same names and signatures:
:mod:`fastbn._cpu_ops` for host arrays and, when installed, the CUDA one for
arrays exposing ``__cuda_array_interface__``.  The backend follows ``x``
unless ``backend=`` forces one; an argument on the other side of the
host/device line is an error, never a silent copy.
"""

from __future__ import annotations

import importlib

import numpy as np

from fastbn import _interop

BACKENDS = ("cpu", "cuda")


def is_device_array(obj):
    """True for GPU arrays (numba, CuPy, PyTorch CUDA): they expose ``__cuda_array_interface__``."""
    if obj is None or isinstance(obj, np.ndarray):
        return False
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except RuntimeError:
        # A torch CUDA tensor that requires grad raises instead of answering.
        return True


def _cuda_ops():
    try:
        return importlib.import_module("fastbn._cuda_ops")
    except ImportError as exc:
        raise ValueError(f"backend: the CUDA backend is not available ({exc})") from None


def prepare(backend, arrays):
    """Choose the backend and convert the call's arrays for it.

    Parameters
    ----------
    backend : {None, "cpu", "cuda"}
        None follows the first array of ``arrays`` (``x`` or ``dy``).
    arrays : list of (str, object)
        The call's array arguments by name, the input first; None entries are
        optional arguments not given.

    Returns
    -------
    ops : module
        The backend's operations.
    restore : callable
        Turns a backend array into the caller's kind (that of the input).
    converted : list
        The arrays, converted for the backend, in the order given.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None, 'cpu' or 'cuda', got {backend!r}")
    first_name, first = arrays[0]
    target = backend or ("cuda" if is_device_array(first) else "cpu")
    for name, obj in arrays:
        if obj is None:
            continue
        if isinstance(obj, (str, bytes)):
            raise TypeError(f"{name}: expected an array, got {type(obj).__name__}")
        on_device = is_device_array(obj)
        if target == "cpu" and on_device:
            raise ValueError(
                f"{name}: is a GPU array but this call runs on the CPU "
                f"(because {'backend=' + repr(backend) if backend else first_name + ' is a host array'}); "
                "pass host arrays, or GPU arrays for every argument"
            )
        if target == "cuda" and not on_device:
            raise ValueError(
                f"{name}: is a host array but this call runs on the GPU "
                f"(because {'backend=' + repr(backend) if backend else first_name + ' is a GPU array'}); "
                "pass GPU arrays for every argument"
            )
    if target == "cuda":
        ops = _cuda_ops()
        return ops, ops.restorer(first), [ops.to_device(obj, name) for name, obj in arrays]
    from fastbn import _cpu_ops

    return _cpu_ops, _interop.restorer(first), [_interop.to_host(obj, name) for name, obj in arrays]
