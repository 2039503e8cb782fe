"""Types of the public API's annotations.

Results follow the caller's kind of array: the functions return the type of their first array
argument (NumPy in, NumPy out; a torch tensor in, a tensor out; a CUDA array in, a CUDA array out),
which :data:`ArrayT` expresses.  Per-channel results have the statistics dtype, which the docstrings
give (float32 for float16 input), so for half-precision input their static dtype is approximate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["ArrayT", "BackendName", "Float64Array", "OptionalArray", "Plan", "StateArray", "SupportsArray"]


class SupportsArray(Protocol):
    """What array arguments have in common: a NumPy array, a torch tensor, a JAX or CUDA array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...


#: The caller's kind of array, returned as it came.
ArrayT = TypeVar("ArrayT", bound=SupportsArray)
#: ``backend=``: None follows the input.
BackendName: TypeAlias = Literal["cpu", "cuda"] | None
#: An optional array argument (per-channel vectors, a residual): anything NumPy converts.
OptionalArray: TypeAlias = npt.ArrayLike | None
#: The private ``_plan=`` of the functions (tests only).
Plan: TypeAlias = Mapping[str, Any] | None
#: The vectors that synchronised batch norm exchanges (:class:`fastbn.Collectives`).
Float64Array: TypeAlias = np.ndarray[tuple[int, ...], np.dtype[np.float64]]
#: A value of :meth:`fastbn.BatchNorm.state_dict`: parameters and statistics, or the int64 batch count.
StateArray: TypeAlias = np.ndarray[tuple[int, ...], np.dtype[np.float32 | np.float64 | np.int64]]
