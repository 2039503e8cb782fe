"""Running one CPU plan on kernel views: the passes each operation of :mod:`fastbn.backends.cpu.ops` is made of.

The functions ending in ``_into`` run one plan on kernel views and write
into given outputs; the benchmark's reused-output diagnostic calls them too.
:data:`LAUNCH_LOG` records every kernel launch when a test sets it to a list.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn._layout import ROWS
from fastbn.backends.cpu import elementwise, fused, numerics, reductions
from fastbn.backends.cpu import plan as cpu_plan
from fastbn.backends.cpu.machine import machine
from fastbn.backends.cpu.threads import kernel_guard, set_thread_count, thread_count

_Array = npt.NDArray[Any]

__all__ = [
    "LAUNCH_LOG",
    "backward_elementwise_into",
    "backward_reduce",
    "backward_train_into",
    "forward_train_into",
    "normalize_into",
    "stats",
]

#: Tests set this to a list to record every kernel launch as ``(kernel name, plan)``.
LAUNCH_LOG: list[tuple[str, cpu_plan.Plan]] | None = None


def _launch(kernel: Any, plan: cpu_plan.Plan, *args: Any) -> None:
    """Run one compiled kernel under the threading layer's guard, logging it if asked."""
    if LAUNCH_LOG is not None:
        LAUNCH_LOG.append((kernel.py_func.__name__, plan))
    with kernel_guard():
        kernel(*args)


@contextlib.contextmanager
def serial_if_small(nbytes: int) -> Iterator[None]:
    """Run the kernels launched inside on this thread alone if the call's input has fewer than
    :func:`fastbn.backends.cpu.plan.serial_bytes` bytes.

    A parallel launch would cost more than it saves there.  Numba's thread
    count is per calling thread, and restored after; the results are the
    same either way (every reduction merges in an order that does not depend
    on the thread count).  One switch per call, not per launch: each switch
    costs a few microseconds.
    """
    if nbytes >= _serial_limit():
        yield
        return
    threads = thread_count()  # not numba.get_num_threads(): see fastbn.backends.cpu.threads, "the thread count"
    if threads == 1:
        yield
        return
    try:
        set_thread_count(1)
        yield
    finally:
        set_thread_count(threads)


@functools.cache
def _serial_limit() -> int:
    return cpu_plan.serial_bytes(machine())


def _nt(plan: cpu_plan.Plan, out: _Array) -> _Array | None:
    """The kernels' ``nt`` argument: a 0-length array of ``out``'s dtype selects non-temporal stores."""
    return np.empty(0, out.dtype) if plan.nontemporal else None


def _floor(dtype: np.dtype[Any], relu: bool) -> Any:
    """The ``floor`` the elementwise kernels clamp to: 0 for the ReLU, -inf for no activation."""
    return np.dtype(dtype).type(0.0 if relu else -np.inf)


# ------------------------------------------------------- running a plan ---
def stats(plan: cpu_plan.Plan, x: _Array) -> tuple[_Array, _Array]:
    """Per-channel float64 ``(mean, biased var)`` of the kernel view ``x``."""
    x = plan.view(x)
    channels = x.shape[1]
    mean = np.empty(channels)
    var = np.empty(channels)
    if plan.layout == ROWS:
        _launch(reductions.stats_rows, plan, x, mean, var)
    elif plan.strategy == "fused":
        _launch(reductions.stats_slab, plan, x, plan.group, mean, var)
    else:
        _launch(reductions.stats_slab_streamed, plan, x, mean, var)
    return mean, var


def normalize_into(
    plan: cpu_plan.Plan,
    x: _Array,
    mean: _Array,
    scale: _Array,
    shift: _Array,
    y: _Array,
    z: _Array | None = None,
    relu: bool = False,
) -> None:
    """Write ``max((x - mean) * scale + shift + z, floor)`` into y (z optional, floor 0 with ``relu``)."""
    x, z, y = plan.view(x), plan.view(z), plan.view(y)
    floor = _floor(scale.dtype, relu)
    if plan.layout == ROWS:
        _launch(elementwise.normalize_rows, plan, x, z, mean, scale, shift, floor, y, _nt(plan, y))
    else:
        _launch(elementwise.normalize_slab, plan, x, z, mean, scale, shift, floor, y, plan.run_group, _nt(plan, y))


def forward_train_into(
    plan: cpu_plan.Plan,
    x: _Array,
    weight: _Array,
    bias: _Array,
    eps: float,
    y: _Array,
    z: _Array | None = None,
    relu: bool = False,
    renorm: tuple[_Array, _Array, float, float] | None = None,
) -> tuple[_Array, _Array, _Array, _Array, _Array]:
    """Batch statistics and the (activated) output; returns float64 ``(mean, var, invstd)`` and ``(r, d)``.

    ``weight`` and ``bias`` are arrays in the statistics dtype (ones and zeros
    when the caller gave none).  ``renorm`` is None or ``(running_mean,
    running_var, rmax, dmax)`` for batch renormalization; ``r`` and ``d``
    come back in the statistics dtype (1 and 0 without it).
    """
    x, z, y = plan.view(x), plan.view(z), plan.view(y)
    channels = x.shape[1]
    dtype = weight.dtype
    if renorm is None:
        ren_mean = ren_var = np.zeros(channels, dtype)
        rmax = dmax = 1.0
    else:
        ren_mean, ren_var, rmax, dmax = renorm
    r = np.empty(channels, dtype)
    d = np.empty(channels, dtype)
    invstd = np.empty(channels)
    if plan.strategy == "streamed":
        mean, var = stats(plan, x)
        used_mean, scale, shift = (np.empty(channels, dtype) for _ in range(3))
        _launch(
            numerics.forward_coefficients,
            plan,
            mean,
            var,
            eps,
            weight,
            bias,
            ren_mean,
            ren_var,
            renorm is not None,
            rmax,
            dmax,
            invstd,
            r,
            d,
            used_mean,
            scale,
            shift,
        )
        normalize_into(plan, x, used_mean, scale, shift, y, z, relu)
        return mean, var, invstd, r, d
    mean = np.empty(channels)
    var = np.empty(channels)
    _launch(
        fused.forward_train_slab,
        plan,
        x,
        z,
        plan.group,
        weight,
        bias,
        eps,
        _floor(dtype, relu),
        ren_mean,
        ren_var,
        renorm is not None,
        rmax,
        dmax,
        y,
        _nt(plan, y),
        mean,
        var,
        invstd,
        r,
        d,
    )
    return mean, var, invstd, r, d


def backward_reduce(
    plan: cpu_plan.Plan, dy: _Array, x: _Array, mean: _Array, m: _Array | None = None
) -> tuple[_Array, _Array]:
    """Per-channel float64 ``(sum_g, dotp)`` with ``dotp = sum((x - mean) * g)``.

    ``g`` is ``dy`` where the ReLU output ``m`` is > 0 and 0 elsewhere, or
    ``dy`` when ``m`` is None.
    """
    dy, m, x = plan.view(dy), plan.view(m), plan.view(x)
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    kernel = reductions.backward_reduce_rows if plan.layout == ROWS else reductions.backward_reduce_slab
    _launch(kernel, plan, dy, m, x, mean, sum_dy, dotp)
    return sum_dy, dotp


def backward_elementwise_into(
    plan: cpu_plan.Plan,
    dy: _Array,
    x: _Array,
    mean: _Array,
    mean_dy: _Array,
    k: _Array,
    scale: _Array,
    dx: _Array,
    m: _Array | None = None,
    dres: _Array | None = None,
) -> None:
    """Write ``dx = (g - mean_dy - (x - mean) * k) * scale``, and ``dres = g`` unless None (g as above)."""
    dy, m, x, dres, dx = plan.view(dy), plan.view(m), plan.view(x), plan.view(dres), plan.view(dx)
    if plan.layout == ROWS:
        _launch(elementwise.backward_elementwise_rows, plan, dy, m, x, dres, mean, mean_dy, k, scale, dx, _nt(plan, dx))
    else:
        _launch(
            elementwise.backward_elementwise_slab,
            plan,
            dy,
            m,
            x,
            dres,
            mean,
            mean_dy,
            k,
            scale,
            dx,
            plan.run_group,
            _nt(plan, dx),
        )


def backward_train_into(
    plan: cpu_plan.Plan,
    dy: _Array,
    x: _Array,
    mean: _Array,
    invstd: _Array,
    weight: _Array,
    dx: _Array,
    m: _Array | None = None,
    dres: _Array | None = None,
) -> tuple[_Array, _Array]:
    """Training-mode gradient: writes dx (and dres), returns float64 ``(sum_g, dotp)``; m, dres as above."""
    dy, m, x, dres, dx = plan.view(dy), plan.view(m), plan.view(x), plan.view(dres), plan.view(dx)
    if plan.strategy == "streamed":
        sum_dy, dotp = backward_reduce(plan, dy, x, mean, m)
        count = x.size // x.shape[1]
        mean_dy, k, scale = (np.empty_like(weight) for _ in range(3))
        _launch(numerics.backward_coefficients, plan, sum_dy, dotp, invstd, weight, count, mean_dy, k, scale)
        backward_elementwise_into(plan, dy, x, mean, mean_dy, k, scale, dx, m, dres)
        return sum_dy, dotp
    channels = x.shape[1]
    sum_dy = np.empty(channels)
    dotp = np.empty(channels)
    _launch(
        fused.backward_train_slab,
        plan,
        dy,
        m,
        x,
        dres,
        plan.group,
        mean,
        invstd,
        weight,
        dx,
        _nt(plan, dx),
        sum_dy,
        dotp,
    )
    return sum_dy, dotp
