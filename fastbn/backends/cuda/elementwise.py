"""The CUDA backend's elementwise kernels: normalization, dx, and the gather of strided inputs.

``normalize`` / ``backward_elementwise`` (and their option variants)
    Grid-stride loops over the flat array; one kernel serves both memory
    patterns of :mod:`fastbn._layout` because the channel index is carried
    along incrementally instead of being divided out of the flat index for
    every element.  ``normalize_residual``, ``normalize_relu`` and
    ``normalize_residual_relu`` add a residual and/or apply a ReLU in the same
    pass; ``backward_elementwise_masked``, ``_dres`` and ``_masked_dres`` mask
    the gradient by ``y > 0`` and/or also write the residual's gradient.
``gather``
    Copies a strided input that fits neither pattern into a contiguous one.

Each element is computed in the accumulation type (float32 for float16 and
float32 input, float64 for float64) from per-channel coefficients in the
statistics dtype, and rounded once to the output dtype.  Kernel options are
compile-time constants of kernels generated per option set, so a disabled
option costs nothing.
"""

from __future__ import annotations

import functools

import numpy as np

from fastbn.backends.cuda.reductions import gradient
from fastbn.backends.cuda.target import cuda, device_function, kernel, named_kernel

__all__ = ["GATHER_RANK", "backward_elementwise_kernel", "gather", "normalize_kernel"]

#: Dimensions (after dropping and merging what can be) that ``gather`` handles;
#: a compile-time constant of the kernel, like the shapes it takes.
GATHER_RANK = 8

# Grid-stride loops over the flat array, in either layout: the flat index is
# ((g * rows + row) * C + c) * inner + i with g the group (ghost batch norm),
# and the per-channel coefficients are indexed by the virtual channel g C + c.
# A cursor (i, c, r, g C), r the offset in the group, is carried along the
# loop by mixed-radix addition: a few integer additions per element, no
# division, and the same code for G = 1, where r never wraps.


@device_function
def _cursor(index, step, channels, inner, group_size):
    # The cursor of flat index `index`, and the cursor increments of a step.
    rows_step = step // inner
    position = (index % inner, (index // inner) % channels, index % group_size, (index // group_size) * channels)
    steps = (step - rows_step * inner, rows_step % channels, step % group_size, (step // group_size) * channels)
    return position, steps


@device_function
def _advance(position, steps, channels, inner, group_size):
    # position + steps, with the carries: i into c, r into the group.
    i = position[0] + steps[0]
    c = position[1] + steps[1]
    r = position[2] + steps[2]
    base = position[3] + steps[3]
    if i >= inner:
        i -= inner
        c += 1
    if c >= channels:
        c -= channels
    if r >= group_size:
        r -= group_size
        base += channels
    return (i, c, r, base)


@functools.cache
def normalize_kernel(acc, relu, residual):
    """The forward elementwise kernel ``normalize[_residual][_relu]`` for one option set.

    Parameters
    ----------
    acc : type
        The compute type (see :func:`~fastbn.backends.cuda.numerics.accumulator`).
    relu : bool
        ReLU at the output, ``v if not v < 0 else 0``: NaN passes, as in PyTorch.
    residual : bool
        Add the residual ``z`` before the activation; without it ``z`` is
        never read (callers pass any array of x's type).
    """

    @named_kernel("normalize" + ("_residual" if residual else "") + ("_relu" if relu else ""))
    def normalize(x, z, channels, inner, group_size, mean, scale, shift, y):
        """y = act((x - mean) * scale + shift [+ z]) per virtual channel; flat arrays in layout order."""
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        position, steps = _cursor(index, step, channels, inner, group_size)
        while index < x.size:
            v = position[1] + position[3]
            value = (acc(x[index]) - mean[v]) * scale[v] + shift[v]
            if residual:
                value += acc(z[index])
            if relu and value < 0:
                value = acc(0)
            y[index] = value
            index += step
            position = _advance(position, steps, channels, inner, group_size)

    return normalize


@functools.cache
def backward_elementwise_kernel(acc, masked, write_dres):
    """The backward elementwise kernel ``backward_elementwise[_masked][_dres]`` for one option set.

    Parameters
    ----------
    acc : type
        The compute type (see :func:`~fastbn.backends.cuda.numerics.accumulator`).
    masked : bool
        The gradient is dy where forward's output y > 0, else 0
        (:func:`~fastbn.backends.cuda.reductions.gradient`); without it ``y``
        is never read.
    write_dres : bool
        Also write that gradient, which is the residual's gradient, to
        ``dres``; without it ``dres`` is never written.
    """
    gradient_at = gradient(acc, masked)

    @named_kernel("backward_elementwise" + ("_masked" if masked else "") + ("_dres" if write_dres else ""))
    def backward_elementwise(dy, x, y, channels, inner, group_size, mean, mean_dy, k, scale, dx, dres):
        """dx = (g - mean_dy - (x - mean) * k) * scale per virtual channel, g the gradient (masked
        by y > 0 if ``masked``); dres = g if ``write_dres``."""
        index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
        position, steps = _cursor(index, step, channels, inner, group_size)
        while index < x.size:
            v = position[1] + position[3]
            grad = gradient_at(dy, y, index)
            # 0 where k is 0 (eval): dx stays finite where x or the mean is NaN or Inf, as in PyTorch.
            centred_k = acc(0) if k[v] == 0 else (acc(x[index]) - mean[v]) * k[v]
            dx[index] = (grad - mean_dy[v] - centred_k) * scale[v]
            if write_dres:
                dres[index] = grad
            index += step
            position = _advance(position, steps, channels, inner, group_size)

    return backward_elementwise


@kernel
def gather(source, start, shape, strides, destination):
    """destination[:] = the strided array whose element [0, ..., 0] is source[start], in C order.

    ``shape`` and ``strides`` (in elements, possibly negative) are tuples of
    GATHER_RANK entries, padded in front with extent-1 dimensions.
    """
    index = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
    while index < destination.size:
        remainder = index
        offset = start
        for d in range(GATHER_RANK - 1, -1, -1):
            quotient = remainder // shape[d]
            offset += (remainder - quotient * shape[d]) * strides[d]
            remainder = quotient
        destination[index] = source[offset]
        index += step
