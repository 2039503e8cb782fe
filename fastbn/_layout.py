"""The two shapes every kernel sees, as pure shape arithmetic shared by both backends.

Whatever its rank and channel axis, an input is seen as

* ``ROWS``: ``(rows, C)``, when moving the channel axis last gives a
  contiguous array (NHWC is ``(N*H*W, C)``, a plain ``(N, C)`` matrix is
  itself, a PyTorch ``channels_last`` tensor is this too); or
* ``SLAB``: ``(outer, C, inner)``, when the array is C-contiguous (NCHW is
  ``(N, C, H*W)``).

ROWS is tried first: an array that is both (the channel axis last, or every
other axis of extent 1) is ROWS.  Any other strided input is copied once into
C order by the backend, in the layout :func:`fallback` names: SLAB, or ROWS
when every axis after the channel axis has extent 1 (then both orders are
the same).  This module only computes with shapes and strides: the CPU backend
applies it to NumPy arrays (:mod:`fastbn.backends.cpu.views`), the CUDA
backend to the CUDA array interface (:mod:`fastbn.backends.cuda.views`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ROWS", "SLAB", "c_strides", "fallback", "is_contiguous_in", "kernel_shape", "order", "pattern"]

SLAB = "slab"
ROWS = "rows"


def c_strides(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """The byte strides of a C-ordered array of ``shape`` (extent-0 axes step as extent 1)."""
    strides = []
    step = itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def order(layout: str, ndim: int, axis: int) -> list[int]:
    """The dimensions of an input in the memory order of ``layout``, slowest first.

    ROWS walks every axis but the channel axis in order, then the channel
    axis; SLAB walks the axes in order (C order).
    """
    if layout == ROWS:
        return [d for d in range(ndim) if d != axis] + [axis]
    return list(range(ndim))


def is_contiguous_in(shape: Sequence[int], strides: Sequence[int], itemsize: int, dims: Sequence[int]) -> bool:
    """Whether walking ``dims`` (last fastest) steps through memory one element at a time.

    Extent-1 dimensions are skipped (their stride is never used), and an
    array with no elements is contiguous in any order, as NumPy's flags say.
    """
    if math.prod(shape) == 0:
        return True
    expected = itemsize
    for d in reversed(dims):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def pattern(shape: Sequence[int], strides: Sequence[int], itemsize: int, axis: int) -> str | None:
    """``ROWS`` or ``SLAB`` if an array of these byte ``strides`` can be viewed as one without a copy, else None."""
    ndim = len(shape)
    for layout in (ROWS, SLAB):
        if is_contiguous_in(shape, strides, itemsize, order(layout, ndim, axis)):
            return layout
    return None


def fallback(shape: Sequence[int], axis: int) -> str:
    """The layout of an input copied (or gathered) into C order: ROWS if nothing follows the channel axis."""
    return ROWS if math.prod(shape[axis + 1 :]) == 1 else SLAB


def kernel_shape(layout: str, shape: Sequence[int], axis: int) -> tuple[int, ...]:
    """The kernel view's shape: ``(rows, C)`` for ROWS, ``(outer, C, inner)`` for SLAB."""
    channels = shape[axis]
    if layout == ROWS:
        return (math.prod(shape) // channels if channels else 0, channels)
    return (math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))
