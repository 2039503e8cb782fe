"""Which framework an object belongs to: the one place fastbn recognises torch, JAX, CuPy, Numba and MPI.

A framework is recognised by looking in ``sys.modules``: if the caller never
imported torch, nothing it passes can be a torch tensor, so this module never
imports a framework itself (``import fastbn`` and every NumPy call stay free
of them).  The answer for an array is cached per type.

Everything that must tell frameworks apart asks here: the backends' array
conversions (:mod:`fastbn.backends.cpu.views`, :mod:`fastbn.backends.cuda.views`),
the dispatcher (host or device), the layer's checkpoint loading and the
synchronised path's process groups (:mod:`fastbn._sync`).

It also makes the error that every import of an optional dependency raises
when that dependency is missing (:func:`missing_dependency`), naming the
extra to install.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["MissingDependency", "framework_of", "is_device_array", "missing_dependency", "process_group_kind"]

#: What :func:`framework_of` answers.
FRAMEWORKS = ("numpy", "torch", "jax", "cupy", "numba", "other")

# type -> framework.  Safe to cache: an instance of a framework's type cannot
# exist before that framework is in sys.modules, so a type classified "other"
# while every imported framework was fully imported never becomes another.
_KIND_BY_TYPE: dict[type, str] = {}


def _base(module_name: str, attribute: str) -> type | None:
    """The framework's array class, or None if it is not (fully) imported."""
    module = sys.modules.get(module_name)
    base = getattr(module, attribute, None) if module is not None else None
    return base if isinstance(base, type) else None


def _classify(obj: Any, cls: type) -> tuple[str, bool]:
    """(framework, settled): settled is False while a framework is half imported."""
    tensor = _base("torch", "Tensor")
    jax_array = _base("jax", "Array")
    cupy_array = _base("cupy", "ndarray")
    settled = all(
        base is not None or name not in sys.modules
        for base, name in ((tensor, "torch"), (jax_array, "jax"), (cupy_array, "cupy"))
    )
    if tensor is not None and issubclass(cls, tensor):
        return "torch", True
    if jax_array is not None and (
        issubclass(cls, jax_array)
        # Tracers are jax.Array instances only by isinstance (their class is
        # not registered), so that a traced value can be named as such.
        or (cls.__module__.partition(".")[0] in ("jax", "jaxlib") and isinstance(obj, jax_array))
    ):
        return "jax", True
    if cupy_array is not None and issubclass(cls, cupy_array):
        return "cupy", True
    if (cls.__module__.startswith("numba.cuda") and hasattr(cls, "__cuda_array_interface__")) or (
        cls.__module__.startswith("numba.cuda.simulator")
    ):
        return "numba", True
    return "other", settled


def framework_of(obj: Any) -> str:
    """The framework whose array ``obj`` is, importing nothing.

    Parameters
    ----------
    obj : object
        Any argument of a fastbn call.

    Returns
    -------
    str
        One of :data:`FRAMEWORKS`: ``"numpy"`` for NumPy arrays, ``"torch"``,
        ``"jax"``, ``"cupy"``, ``"numba"`` (Numba's CUDA device arrays, the
        simulator's included), or ``"other"``.
    """
    if isinstance(obj, np.ndarray):
        return "numpy"
    cls = type(obj)
    kind = _KIND_BY_TYPE.get(cls)
    if kind is not None:
        return kind
    kind, settled = _classify(obj, cls)
    # "other", said while a framework is half imported, may be wrong later.
    if kind != "other" or settled:
        _KIND_BY_TYPE[cls] = kind
    return kind


def is_device_array(obj: Any) -> bool:
    """True for GPU arrays (Numba, CuPy, PyTorch CUDA): they expose ``__cuda_array_interface__``.

    So do the device arrays of Numba's CUDA simulator (``cuda.to_device``
    with ``NUMBA_ENABLE_CUDASIM=1``), which have no interface of their own:
    they are recognised by their class, so that code debugged without a GPU
    takes the GPU path it will take on one.
    """
    if obj is None or isinstance(obj, np.ndarray):
        return False
    if framework_of(obj) == "torch":
        # Asked directly: a CPU tensor's __cuda_array_interface__ raises (after formatting a message),
        # which made this test cost microseconds per argument.
        kind = getattr(getattr(obj, "device", None), "type", None)
        if kind is not None:
            return bool(kind == "cuda")
    if type(obj).__module__.startswith("numba.cuda.simulator.") and hasattr(obj, "copy_to_host"):
        return True
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except RuntimeError:
        # A torch CUDA tensor that requires grad raises instead of answering.
        return True


def process_group_kind(group: Any) -> str:
    """``"mpi"`` (an mpi4py communicator), ``"torch"`` (a torch.distributed group) or ``"other"``."""
    module = type(group).__module__ or ""
    if module.startswith("mpi4py") and hasattr(group, "Allgather"):
        return "mpi"
    if module.startswith("torch") and "torch.distributed" in sys.modules:
        return "torch"
    return "other"


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the fastbn extra that installs it."""


def missing_dependency(what: str, package: str, extra: str, cause: ImportError | None = None) -> MissingDependency:
    """The error for ``what`` needing ``package``, which ``pip install 'fastbn[extra]'`` installs.

    Every import of an optional dependency (torch, JAX, numba-cuda, ...) raises
    this, ``from`` the original ImportError ``cause``: "fastbn.jax needs JAX:
    pip install 'fastbn[jax]'".
    """
    return MissingDependency(
        f"{what} needs {package}: pip install 'fastbn[{extra}]'", name=getattr(cause, "name", None)
    )
