"""Turn any array and channel axis into one of the two views the kernels know.

Whatever its rank and channel axis, an input is seen as

* ``SLAB``: ``(outer, C, inner)``, when the array is C-contiguous (NCHW is
  ``(N, C, H*W)``); or
* ``ROWS``: ``(rows, C)``, when moving the channel axis last gives a
  C-contiguous array (NHWC is ``(N*H*W, C)``, a plain ``(N, C)`` matrix is
  itself, a PyTorch ``channels_last`` tensor is this too).

Both are views, so a contiguous input is never copied.  Any other strided
input is copied once into C order, which is then a ``SLAB`` (or ``ROWS`` if
the channel axis is last).
"""

from __future__ import annotations

import math

import numpy as np

from fastbn import _alloc

SLAB = "slab"
ROWS = "rows"


def _as_kernel_dtype(array):
    # Numba's CPU target has no float16: the kernels read its bits as uint16.
    return array.view(np.uint16) if array.dtype == np.float16 else array


def readonly(array):
    """A read-only view of ``array``, for a kernel input.

    Numba compiles a separate specialisation for read-only arrays (JAX hands
    out read-only buffers); marking every kernel input read-only means one
    compilation serves NumPy, torch and JAX callers alike.
    """
    view = array.view()
    view.flags.writeable = False
    return view


def _try_view(x, axis):
    """Return (layout, view) without copying, or None if x is not contiguous enough."""
    channels = x.shape[axis]
    moved = np.moveaxis(x, axis, -1)
    if moved.flags.c_contiguous:
        return ROWS, moved.reshape(-1, channels)
    if x.flags.c_contiguous:
        outer = math.prod(x.shape[:axis])
        return SLAB, x.reshape(outer, channels, -1)
    return None


def channel_view(x, axis):
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
        ``ROWS`` or ``SLAB``.
    view : numpy.ndarray
        A C-contiguous view of ``x`` (of a copy, if ``x`` was not contiguous
        in either pattern), float16 reinterpreted as uint16.
    """
    found = _try_view(x, axis)
    if found is None:
        found = _try_view(np.ascontiguousarray(x), axis)
    layout, view = found
    return layout, readonly(_as_kernel_dtype(view))


def same_view(layout, a, axis):
    """View ``a`` (shaped like the array that gave ``layout``) in that layout.

    Used for ``dy`` in backward, which must be walked in the same order as
    ``x``, and for outputs; copies only when ``a`` is not contiguous in that
    order.  The view is writable: callers mark inputs with :func:`readonly`.
    """
    channels = a.shape[axis]
    if layout == ROWS:
        view = np.ascontiguousarray(np.moveaxis(a, axis, -1)).reshape(-1, channels)
    else:
        outer = math.prod(a.shape[:axis])
        view = np.ascontiguousarray(a).reshape(outer, channels, -1)
    return _as_kernel_dtype(view)


def empty_like_layout(layout, x, axis):
    """Allocate an output shaped like ``x``, in the memory order of ``layout``.

    The memory comes from :func:`fastbn._alloc.empty`: a large output reuses
    the already paged-in memory of a dead one, instead of a fresh mapping
    whose every page the OS must zero on first write.

    Returns
    -------
    out : numpy.ndarray
        The array to hand back to the caller (channels-last input gives a
        channels-last output).
    view : numpy.ndarray
        Its kernel view, in the same layout as the input's.
    """
    if layout == ROWS:
        moved_shape = x.shape[:axis] + x.shape[axis + 1 :] + (x.shape[axis],)
        moved = _alloc.empty(moved_shape, x.dtype)
        out = np.moveaxis(moved, -1, axis)
    else:
        out = _alloc.empty(x.shape, x.dtype)
    return out, same_view(layout, out, axis)
