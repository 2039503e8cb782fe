"""The CUDA backend's operations, on validated GPU arrays.

The mirror of :mod:`fastbn._cpu_ops`: the same functions with the same
signatures, for arrays exposing ``__cuda_array_interface__`` (numba device
arrays, CuPy arrays, PyTorch CUDA tensors).  Each views its input in a kernel
layout, allocates outputs on the device and launches the kernels of
:mod:`fastbn._cuda`.  Nothing goes to the host between the launches: the
per-channel arithmetic runs in one-thread-per-channel kernels, and results
(``saved.mean`` and ``saved.invstd`` included) stay on the device.

Results are numba device arrays; :func:`restorer` turns them into the caller's
kind, without copying.  Every host-side check that can fail runs before the
first launch, so an error leaves every buffer untouched.

Statistics are accumulated in float32 for float16/float32 input (float64 for
float64), merged per channel in float64, and rounded once to the statistics
dtype, as on the CPU.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from fastbn import _cuda
from fastbn import _cuda_target as target

name = "cuda"


# ------------------------------------------------------------ conversion ---
def to_device(obj, name):
    """Return ``obj`` as a numba device array, without copying (None stays None).

    Parameters
    ----------
    obj : object
        Anything exposing ``__cuda_array_interface__``.
    name : str
        The argument's name, for the error message.

    Raises
    ------
    TypeError
        If ``obj`` is not a GPU array, or its interface cannot be read (a
        PyTorch tensor that requires grad, for one); the message starts with
        ``name``.
    """
    if obj is None:
        return None
    try:
        if target.is_device_array(obj) or hasattr(obj, "__cuda_array_interface__"):
            return target.as_device_array(obj)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name}: cannot be used as a GPU array ({type(exc).__name__}: {exc})") from None
    raise TypeError(
        f"{name}: expected a GPU array (an object exposing __cuda_array_interface__), got {type(obj).__name__}"
    )


def restorer(like):
    """Return a function turning result device arrays into the kind of ``like``.

    numba device arrays stay as they are; a CuPy ``like`` gives CuPy arrays
    (``cupy.asarray``) and a PyTorch tensor gives tensors on its device
    (``torch.as_tensor``), both zero-copy through ``__cuda_array_interface__``.
    Any other kind gives numba device arrays.  The framework is recognised
    from ``type(like).__module__`` and taken from ``sys.modules``: fastbn never
    imports a framework the caller has not imported.
    """
    package = type(like).__module__.partition(".")[0]
    module = sys.modules.get(package)
    if package == "torch" and module is not None:
        device = like.device
        return lambda array: module.as_tensor(array, device=device)
    if package == "cupy" and module is not None:
        return module.asarray
    return lambda array: array


# --------------------------------------------------------------- layouts ---
def _is_contiguous_in(shape, strides, itemsize, order):
    """True if walking the dimensions in ``order`` (last fastest) steps through memory one element at a time."""
    expected = itemsize
    for d in reversed(order):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def _strides(array):
    strides = target.interface(array).get("strides")
    if strides is None:
        return target.c_strides(tuple(array.shape), np.dtype(array.dtype).itemsize)
    return tuple(strides)


class _Plan:
    """How one array reaches a kernel: a flat view, or a gather into a new flat array."""

    def __init__(self, array, order, name):
        self.array = array
        shape = tuple(array.shape)
        self.size = math.prod(shape)
        itemsize = np.dtype(array.dtype).itemsize
        strides = _strides(array)
        self.contiguous = _is_contiguous_in(shape, strides, itemsize, order)
        if self.contiguous:
            return
        if any(s % itemsize for s in strides):
            raise ValueError(f"{name}: strides {strides} are not multiples of the item size {itemsize}")
        # Keep the dimensions in the target order, drop extent-1 ones, merge
        # neighbours that are contiguous with each other.
        dims = [(shape[d], strides[d] // itemsize) for d in order if shape[d] != 1]
        merged = []
        for extent, stride in dims:
            if merged and merged[-1][1] == stride * extent:
                merged[-1] = (merged[-1][0] * extent, stride)
            else:
                merged.append((extent, stride))
        if len(merged) > _cuda.GATHER_RANK:
            raise ValueError(
                f"{name}: a non-contiguous GPU array with more than {_cuda.GATHER_RANK} dimensions that cannot be "
                "merged is not supported; make it contiguous first"
            )
        padding = [(1, 0)] * (_cuda.GATHER_RANK - len(merged))
        self.shape = tuple(int(e) for e, _ in padding + merged)
        self.element_strides = tuple(int(s) for _, s in padding + merged)
        # Lowest and highest element the array touches, relative to element [0, ..., 0].
        self.low = sum(min(0, s * (e - 1)) for e, s in merged)
        self.high = sum(max(0, s * (e - 1)) for e, s in merged)

    def flat(self):
        """The contiguous 1-D array of the elements in the planned order (launches gather if needed)."""
        itemsize = np.dtype(self.array.dtype).itemsize
        if self.contiguous:
            return target.view(self.array, (self.size,), (itemsize,))
        span = target.view(self.array, (self.high - self.low + 1,), (itemsize,), self.low * itemsize)
        destination = target.device_array(self.size, self.array.dtype)
        _cuda.gather_flat(span, -self.low, self.shape, self.element_strides, destination)
        return destination


class _Layout:
    """The kernel layout of an input: ROWS (channels-last order) or SLAB (C order)."""

    def __init__(self, x, axis):
        shape = tuple(x.shape)
        self.shape = shape
        self.axis = axis
        self.channels = shape[axis]
        self.inner = math.prod(shape[axis + 1:])
        self.outer = math.prod(shape[:axis])
        rows_order = [d for d in range(len(shape)) if d != axis] + [axis]
        rows_plan = _Plan(x, rows_order, "x")
        # As on the CPU: channels-last order first, then C order; any other
        # strides are gathered into C order (which is ROWS if inner == 1).
        if rows_plan.contiguous or self.inner == 1:
            self.rows = True
            self.plan = rows_plan
        else:
            self.rows = False
            self.plan = _Plan(x, list(range(len(shape))), "x")
        if self.rows:
            self.outer = math.prod(shape) // self.channels
            self.inner = 1
        self.order = rows_order if self.rows else list(range(len(shape)))

    def same(self, array, name):
        """Plan ``array`` (shaped like x) in this layout's order."""
        return _Plan(array, self.order, name)

    def empty(self, dtype):
        """An output shaped like x in this layout's memory order, and its flat view."""
        itemsize = np.dtype(dtype).itemsize
        flat = target.device_array(math.prod(self.shape), dtype)
        ordered_strides = target.c_strides(tuple(self.shape[d] for d in self.order), itemsize)
        strides = [0] * len(self.shape)
        for position, d in enumerate(self.order):
            strides[d] = ordered_strides[position]
        return target.view(flat, self.shape, tuple(strides)), flat


def _byte_range(array):
    pointer = target.interface(array)["data"][0]
    itemsize = np.dtype(array.dtype).itemsize
    low = high = 0
    for extent, stride in zip(array.shape, _strides(array)):
        low += min(0, stride * (extent - 1))
        high += max(0, stride * (extent - 1))
    return pointer + low, pointer + high + itemsize


def _check_running(running_mean, running_var):
    """The in-place checks the generic validation cannot make on device arrays."""
    if running_mean is None:
        return
    for name, array in (("running_mean", running_mean), ("running_var", running_var)):
        if target.interface(array)["data"][1]:
            raise ValueError(f"{name}: must be writable, it is updated in place")
    (a_low, a_high), (b_low, b_high) = _byte_range(running_mean), _byte_range(running_var)
    if a_low < b_high and b_low < a_high:
        raise ValueError("running_var: must not share memory with running_mean")


def _parameter(value, fallback):
    """A per-channel array and whether it was given (kernels take a dummy array and a flag)."""
    return (fallback, False) if value is None else (value, True)


def _split(buffer, channels, *counts):
    """Consecutive 1-D slices of ``buffer``, the k-th ``counts[k] * channels`` long."""
    pieces = []
    start = 0
    for count in counts:
        pieces.append(buffer[start:start + count * channels])
        start += count * channels
    return pieces


def _vector(array, name):
    """Plan a statistics array, (C,) or ghost batch norm's (G, C), as a flat 1-D kernel input."""
    return _Plan(array, list(range(len(array.shape))), name)


def _grouped(flat, groups, channels):
    """A flat (G C,) result as the (G, C) array of ghost batch norm; as it is when G = 1."""
    if groups == 1:
        return flat
    itemsize = np.dtype(flat.dtype).itemsize
    return target.view(flat, (groups, channels), (channels * itemsize, itemsize))


# ------------------------------------------------------------ operations ---
def _statistics(layout, x_flat, groups=1):
    """Launch the statistics reduction; return the float64 partials and pivots (per group and channel)."""
    slots = groups * layout.channels
    plan = _cuda.ReductionPlan(layout.rows, layout.outer, layout.channels, layout.inner, groups)
    workspace = target.device_array((3 * plan.splits + 1) * slots, np.float64)
    partial_count, partial_mean, partial_m2, pivot = _split(workspace, slots, plan.splits, plan.splits,
                                                            plan.splits, 1)
    _cuda.stats(plan, layout.rows, x_flat, layout.channels, layout.inner, partial_count, partial_mean, partial_m2,
                pivot)
    return partial_count, partial_mean, partial_m2, pivot


def forward_batch(x, axis, dtype, weight, bias, eps, running_mean, running_var, momentum, update, *, relu=False,
                  residual=None, renorm=None, groups=1):
    """Normalise with batch statistics; update running stats (in place, on the device) if ``update``.

    Parameters
    ----------
    relu : bool
        Apply ReLU to the output (NaN passes through), in the same pass.
    residual : device array or None
        Added to the normalised output before the activation; x's shape and
        dtype, any strides.
    renorm : (float, float) or None
        Batch renormalization's (rmax, dmax): r and d come from the running
        statistics as they were before this call's update (G must be 1).
    groups : int
        Ghost batch norm: statistics per group of ``x.shape[0] // groups``
        consecutive samples; the running statistics are updated once, with
        the averages over groups of the group means and unbiased variances.

    Returns
    -------
    y, mean, invstd, r, d
        Output like ``x`` (same memory order); the statistics used, in
        ``dtype``, shape (C,), or (G, C) when ``groups > 1``; batch
        renormalization's r and d, shape (C,), or None without ``renorm``.
        All device arrays.
    """
    layout = _Layout(x, axis)
    _check_running(running_mean, running_var)
    residual_plan = None if residual is None else layout.same(residual, "residual")
    channels = layout.channels
    x_flat = layout.plan.flat()
    z_flat = x_flat if residual_plan is None else residual_plan.flat()
    partials = _statistics(layout, x_flat, groups)
    scratch = target.device_array(2 * channels, np.float64)
    mean64, var64 = _split(scratch, channels, 1, 1)
    renorm_counts = () if renorm is None else (1, 1)
    coefficients = target.device_array((4 * groups + len(renorm_counts)) * channels, dtype)
    saved_mean, saved_invstd, scale, shift, *renorm_out = _split(coefficients, channels, groups, groups, groups,
                                                                 groups, *renorm_counts)
    weight, has_weight = _parameter(weight, scale)
    bias, has_bias = _parameter(bias, shift)
    if renorm is None:
        # (renorm, running_mean, running_var, rmax, dmax, r, d): the arrays are
        # neither read nor written without renorm, any of the type will do.
        renorm_args = (False, scale, scale, 1.0, 0.0, scale, scale)
        r = d = None
    else:
        r, d = renorm_out
        renorm_args = (True, running_mean, running_var, float(renorm[0]), float(renorm[1]), r, d)
    _cuda.launch_per_channel(_cuda.forward_coefficients, channels, *partials, float(eps), weight, has_weight,
                             bias, has_bias, *renorm_args, mean64, var64, saved_mean, saved_invstd, scale, shift)
    if update:
        count = layout.outer * layout.inner // groups
        _cuda.launch_per_channel(_cuda.update_running, channels, running_mean, running_var, mean64, var64,
                                 float(momentum), count / (count - 1.0))
    y, y_flat = layout.empty(x.dtype)
    _cuda.normalize_flat(x_flat, z_flat, channels, layout.inner, groups, saved_mean, scale, shift, y_flat,
                         relu=relu, residual=residual is not None)
    return y, _grouped(saved_mean, groups, channels), _grouped(saved_invstd, groups, channels), r, d


def _normalize_given(x, axis, dtype, mean, var, weight, bias, eps, relu=False, residual=None):
    layout = _Layout(x, axis)
    residual_plan = None if residual is None else layout.same(residual, "residual")
    channels = layout.channels
    x_flat = layout.plan.flat()
    z_flat = x_flat if residual_plan is None else residual_plan.flat()
    coefficients = target.device_array(4 * channels, dtype)
    saved_mean, saved_invstd, scale, shift = _split(coefficients, channels, 1, 1, 1, 1)
    weight, has_weight = _parameter(weight, scale)
    bias, has_bias = _parameter(bias, shift)
    _cuda.launch_per_channel(_cuda.normalize_coefficients, channels, mean, var, float(eps), weight, has_weight,
                             bias, has_bias, saved_mean, saved_invstd, scale, shift)
    y, y_flat = layout.empty(x.dtype)
    _cuda.normalize_flat(x_flat, z_flat, channels, layout.inner, 1, saved_mean, scale, shift, y_flat, relu=relu,
                         residual=residual is not None)
    return y, saved_mean, saved_invstd


def forward_eval(x, axis, dtype, weight, bias, eps, running_mean, running_var, *, relu=False, residual=None):
    """Normalise with the running statistics; returns ``(y, mean, invstd)``.

    ``relu`` and ``residual`` as in :func:`forward_batch`.  ``mean`` is a
    copy, so later updates of ``running_mean`` cannot change ``saved``.
    """
    _check_running(running_mean, running_var)
    return _normalize_given(x, axis, dtype, running_mean, running_var, weight, bias, eps, relu, residual)


def normalize(x, axis, dtype, mean, var, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel."""
    return _normalize_given(x, axis, dtype, mean, var, weight, bias, eps)[0]


def fold(layer_weight, layer_bias, running_mean, running_var, weight, bias, eps, axis):
    """Batch norm folded into the layer before it, with the normalize kernels.

    ``s * W`` is normalize of ``W`` (channel axis ``axis``) with mean 0, and
    ``s * (c - running_mean) + bias`` is normalize of ``c`` seen as a ``(1, C)``
    batch; both computed in the kernels' compute type (float32 for float16 and
    float32 layers) and rounded once to the layer's dtype.
    """
    channels = layer_weight.shape[axis]
    dtype = np.dtype(running_var.dtype)
    folded_weight = _normalize_given(layer_weight, axis, dtype, target.device_zeros(channels, dtype), running_var,
                                     weight, None, eps)[0]
    if layer_bias is None:
        layer_bias = target.device_zeros(channels, layer_weight.dtype)
    as_row = target.view(layer_bias, (1, channels), (0, np.dtype(layer_bias.dtype).itemsize))
    folded_bias = _normalize_given(as_row, 1, dtype, running_mean, running_var, weight, bias, eps)[0]
    return folded_weight, target.view(folded_bias, (channels,), (np.dtype(folded_bias.dtype).itemsize,))


def moments(x, axis, dtype):
    """Per-channel mean and biased variance, in ``dtype``, as device arrays."""
    layout = _Layout(x, axis)
    channels = layout.channels
    partials = _statistics(layout, layout.plan.flat())
    out = target.device_array(2 * channels, dtype)
    mean, var = _split(out, channels, 1, 1)
    _cuda.launch_per_channel(_cuda.stats_merge, channels, *partials, mean, var)
    return mean, var


def backward(dy, x, axis, dtype, weight, mean, invstd, batch_stats, *, y=None, dresidual=False, r=None, d=None,
             groups=1):
    """Gradients ``(dx, dweight, dbias, dres)``; the training formula if ``batch_stats``.

    Parameters
    ----------
    y : device array or None
        Forward's output when forward applied ReLU: the gradient passes only
        where y > 0 (y NaN blocks it), in both passes.
    dresidual : bool
        Also return ``dres``, the gradient of forward's residual: the masked
        gradient (dy itself without ``y``), a new array like ``dx``.
    r, d : device arrays or None
        Batch renormalization's r and d from forward: dx uses the weight
        r * w, ``dweight = r * dotp * invstd + d * sum_dy``.
    groups : int
        Ghost batch norm: ``mean`` and ``invstd`` are (G, C) and each group of
        samples uses its own row; dweight and dbias are summed over groups.

    Returns
    -------
    dx, dweight, dbias, dres
        dres is None unless ``dresidual``.
    """
    mean_plan = _vector(to_device(mean, "saved.mean"), "saved.mean")
    invstd_plan = _vector(to_device(invstd, "saved.invstd"), "saved.invstd")
    r = to_device(r, "saved.r")
    d = to_device(d, "saved.d")
    layout = _Layout(x, axis)
    dy_plan = layout.same(dy, "dy")
    y_plan = None if y is None else layout.same(y, "y")
    channels = layout.channels
    mean, invstd = mean_plan.flat(), invstd_plan.flat()
    x_flat = layout.plan.flat()
    dy_flat = dy_plan.flat()
    y_flat = dy_flat if y_plan is None else y_plan.flat()  # not read without y
    slots = groups * channels
    plan = _cuda.ReductionPlan(layout.rows, layout.outer, channels, layout.inner, groups)
    workspace = target.device_array(2 * plan.splits * slots, np.float64)
    partial_sum_dy, partial_dotp = _split(workspace, slots, plan.splits, plan.splits)
    _cuda.backward_reduce(plan, layout.rows, dy_flat, x_flat, y_flat, mean, channels, layout.inner, partial_sum_dy,
                          partial_dotp, masked=y is not None)
    out = target.device_array((2 + 3 * groups) * channels, dtype)
    dweight, dbias, mean_dy, k, scale = _split(out, channels, 1, 1, groups, groups, groups)
    weight, has_weight = _parameter(weight, scale)
    renorm = r is not None
    _cuda.launch_per_channel(_cuda.backward_coefficients, channels, partial_sum_dy, partial_dotp, invstd, weight,
                             has_weight, layout.outer * layout.inner // groups, bool(batch_stats), renorm,
                             r if renorm else scale, d if renorm else scale, dweight, dbias, mean_dy, k, scale)
    dx, dx_flat = layout.empty(x.dtype)
    dres, dres_flat = layout.empty(x.dtype) if dresidual else (None, dx_flat)  # not written without dresidual
    _cuda.backward_elementwise_flat(dy_flat, x_flat, y_flat, channels, layout.inner, groups, mean, mean_dy, k, scale,
                                    dx_flat, dres_flat, masked=y is not None, write_dres=dresidual)
    return dx, dweight, dbias, dres
