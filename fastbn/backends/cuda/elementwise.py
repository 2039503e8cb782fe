"""The CUDA backend's elementwise kernels: normalization, dx, and the gather of strided inputs.

``normalize`` / ``backward_elementwise`` (and their option variants)
    Loops over *runs*: sets of elements that share one virtual channel, so
    that a thread loads the channel's coefficients into registers once per
    run and its inner loop is only loads, arithmetic and stores.
    ``normalize_residual``, ``normalize_relu`` and ``normalize_residual_relu``
    add a residual and/or apply a ReLU in the same pass;
    ``backward_elementwise_masked``, ``_dres`` and ``_masked_dres`` mask the
    gradient by ``y > 0`` and/or also write the residual's gradient.
``gather``
    Copies a strided input that fits neither pattern into a contiguous one.

Each element is computed in the accumulation type (float32 for float16 and
float32 input, float64 for float64) from per-channel coefficients in the
statistics dtype, and rounded once to the output dtype.  Kernel options are
compile-time constants of kernels generated per option set, so a disabled
option costs nothing.

Runs
----
The flat index of an element is ``((g * rows + row) * C + c) * inner + i``,
``g`` the ghost batch group, and its coefficients are those of the virtual
channel ``g * C + c``.  The array is cut into ``slabs`` of ``slab`` elements
(blockIdx.y walks them), and in a slab a thread takes the elements
``first + j * period``, ``first`` its position (the x threads walk the
positions below ``min(slab, period)``).  The launch
(:func:`fastbn.backends.cuda.plan._elementwise_grid`) picks one of two cuts,
each of which keeps the channel of a run constant:

* *across rows*: a slab is a group (``group_size`` elements) and ``period``
  a multiple of a row's ``C * inner`` elements, so a thread's elements are
  one position of several rows.  Any layout, ROWS (``inner == 1``) included.
* *along a channel*: a slab is one channel's ``inner`` contiguous elements
  of one row and ``period`` the x threads of the grid, for SLAB inputs whose
  groups have too few rows for the first cut (inference on one sample).

Either way consecutive threads read consecutive addresses (coalesced), the
channel of a run costs three integer divisions, and the inner loop handles
:func:`unroll` elements an iteration, all of them loaded before the first is
stored (memory-level parallelism), then a remainder loop one at a time.  A
thread's elements are ``period`` apart rather than a contiguous run read with
vector loads: vector loads need aligned addresses, which a view into a
caller's array does not promise, and would give one thread elements of
different channels in ROWS layout; one element a thread per instruction with
consecutive threads on consecutive addresses already makes each warp's load
one contiguous 64 (float16) to 256 (float64) byte transaction, and float16,
whose loads move half as much per instruction, takes 8 elements an iteration
instead of 4 to keep as many bytes in flight.

Indices
-------
Indices are int64, so nothing wraps at 2**31 elements, but Numba makes every
access by a signed index wrap negative indices around (``i += n`` if
``i < 0``: three instructions an access).  :func:`_index` masks an index
with ``INDEX_MASK`` (2**48 - 1, far beyond any GPU's memory), which tells
the compiler the sign bit and those above bit 48 are clear: sums of a few
such values are then known non-negative, the wraparound folds away, and the
divisions become unsigned ones.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from fastbn.backends.cuda.numerics import accumulator
from fastbn.backends.cuda.target import cuda, device_function, kernel, named_kernel

__all__ = ["GATHER_RANK", "INDEX_MASK", "backward_elementwise_kernel", "gather", "normalize_kernel", "unroll"]

#: Dimensions (after dropping and merging what can be) that ``gather`` handles;
#: a compile-time constant of the kernel, like the shapes it takes.
GATHER_RANK = 8

#: Every index and extent in the elementwise kernels is masked with this (see
#: the module docstring, Indices); no array reaches 2**48 elements.
INDEX_MASK = (1 << 48) - 1


def unroll(dtype: npt.DTypeLike) -> int:
    """Elements per iteration of the inner loops for input of ``dtype``: 8 for 2-byte types, else 4.

    A compile-time constant of the kernels; the launch reads it to size the
    grid so that a thread's run is a few iterations long.
    """
    return 8 if np.dtype(dtype).itemsize == 2 else 4


@device_function
def _index(value):
    # value, known to the compiler to be in [0, 2**48): see the module docstring.
    return value & INDEX_MASK


@device_function
def _load4(array, e, step):
    return (array[e], array[e + step], array[e + 2 * step], array[e + 3 * step])


@device_function
def _store4(array, e, step, values):
    array[e] = values[0]
    array[e + step] = values[1]
    array[e + 2 * step] = values[2]
    array[e + 3 * step] = values[3]


@device_function
def _channel(e, channels, inner, group_size):
    # The virtual channel g C + c of flat index e: once per run, not per element.
    return _index((e // group_size) * channels + (e // inner) % channels)


@functools.cache
def normalize_kernel(dtype, relu, residual):
    """The forward elementwise kernel ``normalize[_residual][_relu]`` for input of ``dtype`` and one option set.

    Parameters
    ----------
    dtype : numpy.dtype
        The input's; sets the compute type
        (:func:`~fastbn.backends.cuda.numerics.accumulator`) and the
        elements an iteration (:func:`unroll`).
    relu : bool
        ReLU at the output, ``v if not v < 0 else 0``: NaN passes, as in PyTorch.
    residual : bool
        Add the residual ``z`` before the activation; without it ``z`` is
        never read (callers pass any array of x's type).
    """
    acc = accumulator(np.dtype(dtype))
    wide = unroll(dtype) == 8

    @device_function
    def value_of(xv, zv, mean_v, scale_v, shift_v):
        value = (acc(xv) - mean_v) * scale_v + shift_v
        if residual:
            value += acc(zv)
        if relu and value < 0:
            value = acc(0)
        return value

    @device_function
    def values4(xs, zs, mean_v, scale_v, shift_v):
        return (
            value_of(xs[0], zs[0], mean_v, scale_v, shift_v),
            value_of(xs[1], zs[1], mean_v, scale_v, shift_v),
            value_of(xs[2], zs[2], mean_v, scale_v, shift_v),
            value_of(xs[3], zs[3], mean_v, scale_v, shift_v),
        )

    @device_function
    def iteration(x, z, y, e, step, mean_v, scale_v, shift_v):
        # unroll(dtype) elements e + k step: every load before the first store.
        xs = _load4(x, e, step)
        zs = _load4(z, e, step) if residual else xs
        if wide:
            e4 = e + 4 * step
            xs4 = _load4(x, e4, step)
            zs4 = _load4(z, e4, step) if residual else xs4
            _store4(y, e4, step, values4(xs4, zs4, mean_v, scale_v, shift_v))
        _store4(y, e, step, values4(xs, zs, mean_v, scale_v, shift_v))

    elements = 8 if wide else 4

    @named_kernel("normalize" + ("_residual" if residual else "") + ("_relu" if relu else ""))
    def normalize(x, z, channels, inner, group_size, slab, period, mean, scale, shift, y):
        """y = act((x - mean) * scale + shift [+ z]) per virtual channel; flat arrays in layout order,
        walked in runs of ``slab`` and ``period`` (module docstring)."""
        channels, inner, group_size = _index(channels), _index(inner), _index(group_size)
        slab, period, size = _index(slab), _index(period), _index(x.size)
        # This thread's first position, the x threads, this block's first slab and the y blocks' slab step
        # (special registers read here, in the kernel, and widened at once).
        first = _index(np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x)
        threads = _index(np.int64(cuda.gridDim.x) * cuda.blockDim.x)
        start = _index(np.int64(cuda.blockIdx.y) * slab)
        start_step = _index(np.int64(cuda.gridDim.y) * slab)
        width = min(slab, period)  # positions of a slab below the period
        last = _index((elements - 1) * period)
        stride = _index(elements * period)
        while start < size:
            end = start + slab
            position = first
            while position < width:
                e = _index(start + position)
                v = _channel(e, channels, inner, group_size)
                mean_v, scale_v, shift_v = mean[v], scale[v], shift[v]
                while e + last < end:
                    iteration(x, z, y, e, period, mean_v, scale_v, shift_v)
                    e = _index(e + stride)
                while e < end:
                    y[e] = value_of(x[e], z[e] if residual else x[e], mean_v, scale_v, shift_v)
                    e = _index(e + period)
                position = _index(position + threads)
            start = _index(start + start_step)

    return normalize


@functools.cache
def backward_elementwise_kernel(dtype, masked, write_dres):
    """The backward elementwise kernel ``backward_elementwise[_masked][_dres]`` for ``dtype`` and one option set.

    Parameters
    ----------
    dtype : numpy.dtype
        The input's; sets the compute type
        (:func:`~fastbn.backends.cuda.numerics.accumulator`) and the
        elements an iteration (:func:`unroll`).
    masked : bool
        The gradient is dy where forward's output y > 0, else 0, y NaN
        included (the rule of :func:`~fastbn.backends.cuda.reductions.gradient`,
        here on loaded values); without it ``y`` is never read.
    write_dres : bool
        Also write that gradient, which is the residual's gradient, to
        ``dres``; without it ``dres`` is never written.
    """
    acc = accumulator(np.dtype(dtype))
    wide = unroll(dtype) == 8

    @device_function
    def gradients_of(dyv, yv, xv, mean_v, mean_dy_v, k_v, scale_v):
        grad = acc(dyv)
        if masked and not acc(yv) > 0:
            grad = acc(0)
        # 0 where k is 0 (eval): dx stays finite where x or the mean is NaN or Inf, as in PyTorch.
        centred_k = acc(0) if k_v == 0 else (acc(xv) - mean_v) * k_v
        return (grad - mean_dy_v - centred_k) * scale_v, grad

    @device_function
    def store4(dx, dres, e, step, dys, ys, xs, mean_v, mean_dy_v, k_v, scale_v):
        g0 = gradients_of(dys[0], ys[0], xs[0], mean_v, mean_dy_v, k_v, scale_v)
        g1 = gradients_of(dys[1], ys[1], xs[1], mean_v, mean_dy_v, k_v, scale_v)
        g2 = gradients_of(dys[2], ys[2], xs[2], mean_v, mean_dy_v, k_v, scale_v)
        g3 = gradients_of(dys[3], ys[3], xs[3], mean_v, mean_dy_v, k_v, scale_v)
        _store4(dx, e, step, (g0[0], g1[0], g2[0], g3[0]))
        if write_dres:
            _store4(dres, e, step, (g0[1], g1[1], g2[1], g3[1]))

    @device_function
    def iteration(dy, x, y, dx, dres, e, step, mean_v, mean_dy_v, k_v, scale_v):
        # unroll(dtype) elements e + k step: every load before the first store.
        dys = _load4(dy, e, step)
        ys = _load4(y, e, step) if masked else dys
        xs = _load4(x, e, step)
        if wide:
            e4 = e + 4 * step
            dys4 = _load4(dy, e4, step)
            ys4 = _load4(y, e4, step) if masked else dys4
            xs4 = _load4(x, e4, step)
            store4(dx, dres, e4, step, dys4, ys4, xs4, mean_v, mean_dy_v, k_v, scale_v)
        store4(dx, dres, e, step, dys, ys, xs, mean_v, mean_dy_v, k_v, scale_v)

    elements = 8 if wide else 4

    @named_kernel("backward_elementwise" + ("_masked" if masked else "") + ("_dres" if write_dres else ""))
    def backward_elementwise(dy, x, y, channels, inner, group_size, slab, period, mean, mean_dy, k, scale, dx, dres):
        """dx = (g - mean_dy - (x - mean) * k) * scale per virtual channel, g the gradient (masked
        by y > 0 if ``masked``); dres = g if ``write_dres``.  Walked as ``normalize`` is."""
        channels, inner, group_size = _index(channels), _index(inner), _index(group_size)
        slab, period, size = _index(slab), _index(period), _index(x.size)
        # This thread's first position, the x threads, this block's first slab and the y blocks' slab step
        # (special registers read here, in the kernel, and widened at once).
        first = _index(np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x)
        threads = _index(np.int64(cuda.gridDim.x) * cuda.blockDim.x)
        start = _index(np.int64(cuda.blockIdx.y) * slab)
        start_step = _index(np.int64(cuda.gridDim.y) * slab)
        width = min(slab, period)  # positions of a slab below the period
        last = _index((elements - 1) * period)
        stride = _index(elements * period)
        while start < size:
            end = start + slab
            position = first
            while position < width:
                e = _index(start + position)
                v = _channel(e, channels, inner, group_size)
                mean_v, mean_dy_v, k_v, scale_v = mean[v], mean_dy[v], k[v], scale[v]
                while e + last < end:
                    iteration(dy, x, y, dx, dres, e, period, mean_v, mean_dy_v, k_v, scale_v)
                    e = _index(e + stride)
                while e < end:
                    dx_e, grad = gradients_of(dy[e], y[e] if masked else dy[e], x[e], mean_v, mean_dy_v, k_v, scale_v)
                    dx[e] = dx_e
                    if write_dres:
                        dres[e] = grad
                    e = _index(e + period)
                position = _index(position + threads)
            start = _index(start + start_step)

    return backward_elementwise


@device_function
def _source_offset(index, start, shape, strides):
    # The source offset of destination element `index`: its coordinates, last
    # dimension first, until the quotient is 0 (the padded leading dimensions
    # and any leading coordinates 0 then cost nothing).
    remainder = index
    offset = start
    for d in range(GATHER_RANK - 1, -1, -1):
        if remainder != 0:
            extent = _index(shape[d])
            quotient = remainder // extent
            offset += (remainder - quotient * extent) * strides[d]
            remainder = quotient
    return _index(offset)


@kernel
def gather(source, start, shape, strides, destination):
    """destination[:] = the strided array whose element [0, ..., 0] is source[start], in C order.

    ``shape`` and ``strides`` (in elements, possibly negative) are tuples of
    GATHER_RANK entries, padded in front with extent-1 dimensions.  Each
    thread copies 4 elements an iteration, ``step`` apart (coalesced on
    the destination), loading all 4 before it stores any; then a remainder
    loop.
    """
    index = _index(np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x)
    step = _index(np.int64(cuda.gridDim.x) * cuda.blockDim.x)
    size = _index(destination.size)
    last = _index(3 * step)
    while index + last < size:
        values = (
            source[_source_offset(index, start, shape, strides)],
            source[_source_offset(index + step, start, shape, strides)],
            source[_source_offset(index + 2 * step, start, shape, strides)],
            source[_source_offset(index + last, start, shape, strides)],
        )
        _store4(destination, index, step, values)
        index = _index(index + 4 * step)
    while index < size:
        destination[index] = source[_source_offset(index, start, shape, strides)]
        index = _index(index + step)
