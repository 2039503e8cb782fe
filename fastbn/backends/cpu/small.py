"""Plain calls: the fewest Python operations before the kernels, on the calling thread when small.

The full path of :func:`fastbn.forward` and :func:`fastbn.backward` spends
tens of Python-level checks and conversions, a plan, four or five launches
on the threading layer around its kernels: on a (32, 64) float32 batch (8 KB,
a microsecond of arithmetic) far more than the kernels, and on a few-MB one
still a large part of a call whose kernel is one pass over cached memory.

So :func:`fastbn.forward` and :func:`fastbn.backward` first offer the call
to :func:`forward` and :func:`backward` here.  They accept only the plainest
case (C-contiguous NumPy arrays of the kernel dtypes, the statistics arrays
in the statistics dtype, shape ``(C,)`` and contiguous, no fused option, a
momentum in [0, 1], a positive eps) and return None for anything else, and
for anything that would be an error: the full path then takes the call,
with its checks and its messages.  What they accept, they check for what
only the data can tell (that no running statistic overlaps another
argument, that eval's running variance is non-negative, that a saved invstd
is not negative) before anything is written, and compute:

* below :func:`fastbn.backends.cpu.plan.serial_bytes` (a core's share of
  cache), with one kernel of this module, which calls the serial twins of
  the full path's own kernels (:func:`fastbn.backends.cpu.jit.serial_twin`)
  on this thread, without the parallel runtime's start-up cost;
* at or above it, with the full path's own passes
  (:mod:`fastbn.backends.cpu.passes`) on the threading layer, under the plan
  the full path would choose, into an output from the pool.

Above the limit the result is the full path's bit for bit (the same
kernels); below it, the same code compiled into another kernel, within the
ulps the README states.  ``tests/test_small.py`` compares the two on every
accepted case, small and large, and checks that each refused case reaches
the full path.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn._layout import ROWS, SLAB
from fastbn._options import MIN_EPS_FLOAT32  # a smaller eps (any dtype) takes the full path, which decides
from fastbn._validate import is_bfloat16
from fastbn.backends.cpu import alloc, elementwise, fused, passes, reductions
from fastbn.backends.cpu import plan as cpu_plan
from fastbn.backends.cpu.jit import exact, kernel, serial_twin
from fastbn.backends.cpu.numerics import backward_coefficients, forward_coefficients, update_running

__all__ = ["ENV_VAR", "Plan", "backward", "backward_planned", "forward"]

#: Set to "0" to send every call through the full path.
ENV_VAR = "FASTBN_SMALL_CALLS"

_Array = npt.NDArray[Any]

_stats_rows = serial_twin(reductions.stats_rows)
_normalize_rows = serial_twin(elementwise.normalize_rows)
_normalize_slab = serial_twin(elementwise.normalize_slab)
_forward_train_slab = serial_twin(fused.forward_train_slab)
_backward_reduce_rows = serial_twin(reductions.backward_reduce_rows)
_backward_elementwise_rows = serial_twin(elementwise.backward_elementwise_rows)
_backward_train_slab = serial_twin(fused.backward_train_slab)


# ------------------------------------------------------------- kernels ---
@exact
def _overlaps(a, b):
    """Whether the contiguous arrays ``a`` and ``b`` share a byte (None shares nothing)."""
    if a is None or b is None:
        return False
    pa = a.ctypes.data
    pb = b.ctypes.data
    return pa < pb + b.size * b.itemsize and pb < pa + a.size * a.itemsize


@exact
def _aliased(running_mean, running_var, weight, bias, x):
    """Whether a running statistic shares memory with another argument (the full path then refuses it)."""
    for running in (running_mean, running_var):
        if _overlaps(running, weight) or _overlaps(running, bias) or _overlaps(running, x):
            return True
    return _overlaps(running_mean, running_var)


@exact
def _any_negative(a):
    """Whether an element of ``a`` is below zero (a tampered ``saved.invstd``: the full path names it)."""
    for i in range(a.shape[0]):  # noqa: SIM110  (compiled by Numba: a loop, not any() of a generator)
        if a[i] < 0:
            return True
    return False


@exact
def _finish_forward(mean, var, invstd, running_mean, running_var, momentum, count, mean_out, invstd_out):
    """The running-statistics update and the saved statistics, as the full path does them after its kernels."""
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, momentum, count)
    for c in range(mean.shape[0]):
        mean_out[c] = mean[c]
        invstd_out[c] = invstd[c]


@kernel(parallel=False)
def forward_train_rows(x, weight, bias, eps, floor, running_mean, running_var, momentum, y, mean_out, invstd_out):
    """Training forward of an (M, C) view: the streamed ROWS plan's kernels, serially; False if aliased."""
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    C = x.shape[1]
    mean = np.empty(C)
    var = np.empty(C)
    _stats_rows(x, mean, var)
    invstd = np.empty(C)
    zeros = np.zeros_like(weight)
    r = np.empty_like(weight)
    d = np.empty_like(weight)
    used_mean = np.empty_like(weight)
    scale = np.empty_like(weight)
    shift = np.empty_like(weight)
    forward_coefficients(
        mean, var, eps, weight, bias, zeros, zeros, False, 1.0, 1.0, invstd, r, d, used_mean, scale, shift
    )
    _normalize_rows(x, None, used_mean, scale, shift, floor, y, None)
    _finish_forward(mean, var, invstd, running_mean, running_var, momentum, float(x.shape[0]), mean_out, invstd_out)
    return True


@kernel(parallel=False)
def forward_train_slab(x, weight, bias, eps, floor, running_mean, running_var, momentum, y, mean_out, invstd_out):
    """Training forward of an (N, C, L) view: the fused SLAB kernel with every channel in one task; False if aliased."""
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    N, C, L = x.shape
    mean = np.empty(C)
    var = np.empty(C)
    invstd = np.empty(C)
    zeros = np.zeros_like(weight)
    r = np.empty_like(weight)
    d = np.empty_like(weight)
    _forward_train_slab(
        x, None, C, weight, bias, eps, floor, zeros, zeros, False, 1.0, 1.0, y, None, mean, var, invstd, r, d
    )
    _finish_forward(mean, var, invstd, running_mean, running_var, momentum, float(N * L), mean_out, invstd_out)
    return True


@exact
def _eval_coefficients(running_mean, running_var, eps, weight, mean_out, invstd_out, scale):
    """Eval's ``mean``, ``invstd = 1 / sqrt(var + eps)`` and ``scale = invstd * weight``, each rounded as the
    full path rounds it; False (nothing written) if a running variance is negative."""
    for c in range(running_var.shape[0]):
        if running_var[c] < 0:
            return False
    for c in range(running_var.shape[0]):
        mean_out[c] = running_mean[c]
        invstd_out[c] = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
        scale[c] = np.float64(invstd_out[c]) * np.float64(weight[c])
    return True


@kernel(parallel=False)
def forward_eval_rows(x, weight, bias, eps, floor, running_mean, running_var, y, mean_out, invstd_out):
    """Eval forward of an (M, C) view with the running statistics; False if aliased or a variance is negative."""
    scale = np.empty_like(weight)
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    if not _eval_coefficients(running_mean, running_var, eps, weight, mean_out, invstd_out, scale):
        return False
    _normalize_rows(x, None, mean_out, scale, bias, floor, y, None)
    return True


@kernel(parallel=False)
def forward_eval_slab(x, weight, bias, eps, floor, running_mean, running_var, y, mean_out, invstd_out):
    """Eval forward of an (N, C, L) view; as :func:`forward_eval_rows`."""
    scale = np.empty_like(weight)
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    if not _eval_coefficients(running_mean, running_var, eps, weight, mean_out, invstd_out, scale):
        return False
    _normalize_slab(x, None, mean_out, scale, bias, floor, y, x.shape[1], None)
    return True


@exact
def _finish_backward(sum_dy, dotp, invstd, dweight_out, dbias_out):
    """``dweight = dotp * invstd`` and ``dbias = sum_dy``, summed into zeros as the full path does."""
    for c in range(sum_dy.shape[0]):
        dbias_out[c] = 0.0 + sum_dy[c]
        dweight_out[c] = 0.0 + dotp[c] * np.float64(invstd[c])


@kernel(parallel=False)
def backward_train_rows(dy, x, mean, invstd, weight, dx, dweight_out, dbias_out):
    """Training backward of (M, C) views: the streamed ROWS plan's kernels, serially."""
    M, C = x.shape
    sum_dy = np.empty(C)
    dotp = np.empty(C)
    _backward_reduce_rows(dy, None, x, mean, sum_dy, dotp)
    mean_dy = np.empty_like(weight)
    k = np.empty_like(weight)
    scale = np.empty_like(weight)
    backward_coefficients(sum_dy, dotp, invstd, weight, M, mean_dy, k, scale)
    _backward_elementwise_rows(dy, None, x, None, mean, mean_dy, k, scale, dx, None)
    _finish_backward(sum_dy, dotp, invstd, dweight_out, dbias_out)


@kernel(parallel=False)
def backward_train_slab(dy, x, mean, invstd, weight, dx, dweight_out, dbias_out):
    """Training backward of (N, C, L) views: the fused SLAB kernel with every channel in one task."""
    C = x.shape[1]
    sum_dy = np.empty(C)
    dotp = np.empty(C)
    _backward_train_slab(dy, None, x, None, C, mean, invstd, weight, dx, None, sum_dy, dotp)
    _finish_backward(sum_dy, dotp, invstd, dweight_out, dbias_out)


# ------------------------------------------------- the parallel kernels ---
# At or above the limit, a plain call runs the full path's own passes (fastbn.backends.cpu.passes) with the
# plan the full path would choose, and the same per-channel arithmetic as the serial kernels above.


def _train_parallel(
    rows: bool,
    x: _Array,
    weight: _Array,
    bias: _Array,
    eps: float,
    running_mean: _Array | None,
    running_var: _Array | None,
    momentum: float,
    y: _Array,
    mean_out: _Array,
    invstd_out: _Array,
    fresh: bool,
) -> bool:
    """Training forward of a kernel view on the threading layer; False (nothing written) if aliased."""
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    chosen = cpu_plan.choose("forward_train", ROWS if rows else SLAB, x.shape, x.itemsize, out_fresh=fresh)
    mean, var, invstd, _r, _d = passes.forward_train_into(chosen, x, weight, bias, eps, y)
    count = float(x.size // x.shape[1])
    _finish_forward(mean, var, invstd, running_mean, running_var, momentum, count, mean_out, invstd_out)
    return True


def _eval_parallel(
    rows: bool,
    x: _Array,
    weight: _Array,
    bias: _Array,
    eps: float,
    running_mean: _Array,
    running_var: _Array,
    y: _Array,
    mean_out: _Array,
    invstd_out: _Array,
    fresh: bool,
) -> bool:
    """Eval forward of a kernel view on the threading layer; as :func:`forward_eval_rows`."""
    scale = np.empty_like(weight)
    if _aliased(running_mean, running_var, weight, bias, x):
        return False
    if not _eval_coefficients(running_mean, running_var, eps, weight, mean_out, invstd_out, scale):
        return False
    chosen = cpu_plan.choose("normalize", ROWS if rows else SLAB, x.shape, x.itemsize, out_fresh=fresh)
    passes.normalize_into(chosen, x, mean_out, scale, bias, y)
    return True


# -------------------------------------------------------- the Python side ---
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
#: Input dtype -> (statistics dtype, what the kernels see it as: None for itself, or an integer view).
_KINDS: dict[np.dtype[Any], tuple[np.dtype[Any], Any]] = {
    np.dtype(np.float16): (_F32, np.uint16),
    _F32: (_F32, None),
    _F64: (_F64, None),
}
#: The ``floor`` the elementwise kernels clamp to without an activation, per statistics dtype.
_FLOOR = {_F32: np.float32(-np.inf), _F64: np.float64(-np.inf)}


def _kind(dtype: np.dtype[Any]) -> tuple[np.dtype[Any], Any] | None:
    kind = _KINDS.get(dtype)
    if kind is None and is_bfloat16(dtype):
        kind = _KINDS[dtype] = (_F32, np.int16)
    return kind


@functools.cache
def _limit() -> int:
    """The input size below which calls run serially; on the first call, also fastbn's threading layer.

    The small kernels never launch on the layer, but fastbn chooses it (and
    reports one that other code started first) before its first kernel
    runs, whichever path that kernel is on.  ``FASTBN_SMALL_CALLS=0`` in the
    environment turns this lane off, small and large calls alike (0 here:
    every call takes the full path, to time it or to test its machinery).
    """
    from fastbn.backends.cpu.passes import _serial_limit
    from fastbn.backends.cpu.threads import configure

    configure()
    return 0 if os.environ.get(ENV_VAR, "1").strip() == "0" else _serial_limit()


def _layout(x: _Array, axis: Any) -> tuple[bool, tuple[int, ...], int, int, int | None] | None:
    """``(rows, kernel shape, channels, count, moved)`` of a plain ``x``, or None if not a plain case.

    For a C-contiguous array, :func:`fastbn._layout.pattern` says ROWS
    exactly when nothing of extent > 1 follows the channel axis or the
    channel axis has extent 1, and SLAB otherwise; ``moved`` is then None.
    One channel is one SLAB run ``(1, 1, count)``, as the full path's plan
    views it, so that both sum its elements in the same order.
    An array that is C-contiguous once its channel axis is moved last (a
    channels-last torch tensor seen in NCHW order) is ROWS too, with
    ``moved`` its channel axis: the kernels see it, and write its outputs,
    in that order (:func:`_in_rows_order`), as the full path's
    ``views.channel_view`` and ``views.empty_like_layout`` do.
    """
    shape = x.shape
    ndim = len(shape)
    if type(axis) is not int or ndim < 2 or x.size == 0 or not _limit():
        return None
    if axis < 0:
        axis += ndim
    if not 0 < axis < ndim:
        return None
    channels = shape[axis]
    count = x.size // channels
    if not x.flags.c_contiguous:
        if axis == ndim - 1 or not np.moveaxis(x, axis, -1).flags.c_contiguous:
            return None
        return True, (count, channels), channels, count, axis
    if channels == 1:  # one contiguous run, which the full path's plan streams as a SLAB: the same sums
        return False, (1, 1, count), channels, count, None
    inner = math.prod(shape[axis + 1 :])
    if inner == 1:
        return True, (count, channels), channels, count, None
    return False, (count // inner, channels, inner), channels, count, None


def _in_rows_order(a: _Array, moved: int | None) -> _Array:
    """``a`` with its channel axis ``moved`` last (a view), or ``a`` itself when ``moved`` is None."""
    return a if moved is None else np.moveaxis(a, moved, -1)


def _output(
    shape: tuple[int, ...], dtype: np.dtype[Any], moved: int | None, serial: bool
) -> tuple[_Array, _Array, bool]:
    """``(output as the caller gets it, the same in rows order, fresh)``: from the heap if serial, else the pool."""
    out, fresh = (np.empty(shape, dtype), False) if serial else alloc.allocate(shape, dtype)
    return (out if moved is None else np.moveaxis(out, -1, moved)), out, fresh


def _vector(a: Any, dtype: np.dtype[Any], channels: int) -> bool:
    """Whether ``a`` is a contiguous ``(channels,)`` NumPy array of ``dtype``."""
    return type(a) is np.ndarray and a.dtype == dtype and a.shape == (channels,) and a.flags.c_contiguous


def _writable(a: _Array) -> _Array:
    """A per-channel input, copied if read-only: one compiled kernel whatever the caller's flags (views.vector)."""
    return a if a.flags.writeable else a.copy()


def _kernel_view(a: _Array, shape: tuple[int, ...], as_int: Any, readonly: bool) -> _Array:
    """``a`` as the kernels see it: of the kernel shape, integers for half types, read-only where only read.

    An array of the kernel shape already (a 2-D rows array) is not
    reshaped; the flag is set on a view, never on the caller's array.
    """
    if a.shape == shape:  # the kernel shape already
        if as_int is None and not readonly:
            return a
        view: _Array = a.view()
    else:
        view = a.reshape(shape)
    if as_int is not None:
        view = view.view(as_int)
    if readonly:
        view.flags.writeable = False  # one compiled kernel for NumPy, torch and JAX callers (views.readonly)
    return view


#: What :func:`backward_planned` needs of a small training forward: ``(rows, kernel shape, integer view of
#: the half types or None, x's read-only kernel view, x's shape and dtype, the weight (ones if None), mean,
#: invstd, the channel axis of a channels-last x or None)``.
Plan = tuple[bool, tuple[int, ...], Any, _Array, tuple[int, ...], np.dtype[Any], _Array, _Array, _Array, int | None]


def forward(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: Any,
    momentum: Any,
    eps: Any,
    axis: Any,
) -> tuple[_Array, tuple[_Array, _Array, bool, int, tuple[int, ...], int], Plan | None] | None:
    """:func:`fastbn.forward` without fused options, if the call is a plain one; None otherwise.

    Returns ``(y, (mean, invstd, batch_stats, count, shape, axis), plan)``:
    the fields of the :class:`fastbn.Saved` the full path would return, and
    the :data:`Plan` of the backward (None in eval), for
    :func:`backward_planned`: fastbn.torch's lane keeps it in its autograd
    context, so its backward repeats none of these checks and views.
    """
    if type(x) is not np.ndarray or type(training) is not bool or type(eps) is not float:
        return None
    if type(momentum) is not float or not (0.0 <= momentum <= 1.0 and MIN_EPS_FLOAT32 <= eps < math.inf):
        return None
    kind = _kind(x.dtype)
    layout = None if kind is None else _layout(x, axis)
    if layout is None:
        return None
    assert kind is not None
    rows, shape, channels, count, moved = layout
    dtype, as_int = kind
    has_running = running_mean is not None
    if has_running != (running_var is not None):
        return None
    batch_stats = training or not has_running
    if batch_stats and count < 2:
        return None
    vector_shape = (channels,)
    for vector in (weight, bias, running_mean, running_var):  # _vector, inlined: every small call
        if vector is not None and (
            type(vector) is not np.ndarray
            or vector.dtype != dtype
            or vector.shape != vector_shape
            or not vector.flags.c_contiguous
        ):
            return None
    if training and has_running:
        if not (running_mean.flags.writeable and running_var.flags.writeable):
            return None  # the full path names the argument
        for param in (weight, bias):
            # A read-only parameter is copied (_writable) before the kernels check for overlaps, so its
            # overlap with a running statistic (which the update would overwrite) is checked here, on the
            # caller's memory; the full path then names it.
            if (
                param is not None
                and not param.flags.writeable
                and (np.may_share_memory(param, running_mean) or np.may_share_memory(param, running_var))
            ):
                return None
    serial = x.nbytes < _limit()
    source = _in_rows_order(x, moved)
    x_view = _kernel_view(source, shape, as_int, True)
    y, y_rows, fresh = _output(source.shape, x.dtype, moved, serial)
    y_view = _kernel_view(y_rows, shape, as_int, False)
    mean = np.empty(channels, dtype)
    invstd = np.empty(channels, dtype)
    weight = np.ones(channels, dtype) if weight is None else _writable(weight)
    bias = np.zeros(channels, dtype) if bias is None else _writable(bias)
    if batch_stats:
        update = training and has_running
        rm, rv = (running_mean, running_var) if update else (None, None)
        if serial:
            train = forward_train_rows if rows else forward_train_slab
            ok = train(x_view, weight, bias, eps, _FLOOR[dtype], rm, rv, momentum, y_view, mean, invstd)
        else:
            ok = _train_parallel(rows, x_view, weight, bias, eps, rm, rv, momentum, y_view, mean, invstd, fresh)
    else:
        rm, rv = _writable(running_mean), _writable(running_var)
        if serial:
            infer = forward_eval_rows if rows else forward_eval_slab
            ok = infer(x_view, weight, bias, eps, _FLOOR[dtype], rm, rv, y_view, mean, invstd)
        else:
            ok = _eval_parallel(rows, x_view, weight, bias, eps, rm, rv, y_view, mean, invstd, fresh)
    if not ok:
        return None
    plan = (rows, shape, as_int, x_view, x.shape, x.dtype, weight, mean, invstd, moved) if batch_stats else None
    return y, (mean, invstd, batch_stats, count, x.shape, axis + len(x.shape) if axis < 0 else axis), plan


def backward(
    dy: Any,
    x: Any,
    weight: Any,
    mean: Any,
    invstd: Any,
    saved_shape: Any,
    saved_axis: Any,
    axis: Any,
) -> tuple[_Array, _Array, _Array] | None:
    """:func:`fastbn.backward` of a plain training-mode :class:`fastbn.Saved`; None otherwise."""
    if type(x) is not np.ndarray or type(dy) is not np.ndarray or dy.dtype != x.dtype or x.shape != dy.shape:
        return None
    kind = _kind(x.dtype)
    layout = None if kind is None else _layout(x, axis)
    if layout is None or x.shape != saved_shape:
        return None
    assert kind is not None
    rows, shape, channels, _count, moved = layout
    if (axis + x.ndim if axis < 0 else axis) != saved_axis:
        return None
    dtype, as_int = kind
    for vector in (weight, mean, invstd):
        if vector is not None and not _vector(vector, dtype, channels):
            return None
    if mean is None or invstd is None:
        return None
    invstd = _writable(invstd)  # before the check too: a read-only array would compile it again
    if _any_negative(invstd):
        return None
    weight = np.ones(channels, dtype) if weight is None else _writable(weight)
    x_view = _kernel_view(_in_rows_order(x, moved), shape, as_int, True)
    return _backward(dy, rows, shape, as_int, x_view, x.dtype, weight, _writable(mean), invstd, moved)


def backward_planned(dy: Any, plan: Plan) -> tuple[_Array, _Array, _Array] | None:
    """The training backward of the forward that made ``plan``, for a gradient ``dy``; None if not plain.

    ``dy`` must be a NumPy array of x's shape and dtype (copied if not
    C-contiguous); everything else was checked by the forward.
    """
    rows, shape, as_int, x_view, x_shape, x_dtype, weight, mean, invstd, moved = plan
    if type(dy) is not np.ndarray or dy.dtype != x_dtype or dy.shape != x_shape:
        return None
    return _backward(dy, rows, shape, as_int, x_view, x_dtype, weight, mean, invstd, moved)


def _backward(
    dy: _Array,
    rows: bool,
    shape: tuple[int, ...],
    as_int: Any,
    x_view: _Array,
    x_dtype: np.dtype[Any],
    weight: _Array,
    mean: _Array,
    invstd: _Array,
    moved: int | None,
) -> tuple[_Array, _Array, _Array]:
    """``(dx, dweight, dbias)`` of a checked plain training call: serially below the limit, else in parallel.

    dy is read, and dx written, in x's order (rows order for a channels-last x, ``moved``).
    """
    serial = x_view.nbytes < _limit()
    dy = _in_rows_order(dy, moved)
    if not dy.flags.c_contiguous:
        dy = np.ascontiguousarray(dy)  # an expanded gradient (of a sum) has zero strides: one copy, as the full path
    channels = mean.shape[0]
    dx, dx_rows, fresh = _output(dy.shape, x_dtype, moved, serial)
    dweight = np.empty(channels, mean.dtype)
    dbias = np.empty(channels, mean.dtype)
    dy_view = _kernel_view(dy, shape, as_int, True)
    dx_view = _kernel_view(dx_rows, shape, as_int, False)
    if serial:
        train = backward_train_rows if rows else backward_train_slab
        train(dy_view, x_view, mean, invstd, weight, dx_view, dweight, dbias)
    else:
        chosen = cpu_plan.choose("backward_train", ROWS if rows else SLAB, shape, x_view.itemsize, out_fresh=fresh)
        sum_dy, dotp = passes.backward_train_into(chosen, dy_view, x_view, mean, invstd, weight, dx_view)
        _finish_backward(sum_dy, dotp, invstd, dweight, dbias)
    return dx, dweight, dbias
