"""The CPU backend: fastbn's operations on validated NumPy arrays.

:class:`CpuBackend` implements :class:`fastbn.backends.Backend`.  Each method
views its input in a kernel layout (:mod:`fastbn.backends.cpu.views`),
allocates outputs from the output pool, chooses the plan once
(:func:`fastbn.backends.cpu.plan.choose`), runs the plan's kernels, and does
the small per-channel arithmetic in between.  Every argument has already
been checked by :mod:`fastbn._api`.

Per-channel statistics come out of the kernels in float64 and are rounded
once to the statistics dtype (float32 for float16/bfloat16/float32 input).

The passes that run one plan on kernel views (``stats``, the functions ending
in ``_into``) are in :mod:`fastbn.backends.cpu.passes`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from fastbn._layout import ROWS
from fastbn.backends import Backend, SyncPieces
from fastbn.backends.cpu import numerics, views, weighted
from fastbn.backends.cpu import plan as cpu_plan
from fastbn.backends.cpu.passes import (
    backward_elementwise_into,
    backward_reduce,
    backward_train_into,
    forward_train_into,
    normalize_into,
    serial_if_small,
    stats,
)
from fastbn.backends.cpu.threads import kernel_guard

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Array = npt.NDArray[Any]

__all__ = ["BACKEND", "CpuBackend", "CpuSyncPieces"]


def _ieee(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``method`` with NumPy's floating-point warnings off: its host arithmetic (invstd from a
    variance, casts of float64 statistics) follows IEEE as the kernels do, NaN and Inf included (eps=0 on
    a zero variance is an infinite invstd, a float32 variance beyond 3.4e38 is inf), as in PyTorch,
    without a RuntimeWarning for what is the documented result.

    And on one thread when the call's input (its first argument: x, or dy in backward) is small
    (:func:`fastbn.backends.cpu.passes.serial_if_small`)."""

    @functools.wraps(method)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        first = args[1] if len(args) > 1 else None
        nbytes = first.nbytes if isinstance(first, np.ndarray) else _LARGE
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"), serial_if_small(nbytes):
            return method(*args, **kwargs)

    return quiet


#: Stands for the size of an input that is not an array (never run serially on that account).
_LARGE = 1 << 62


def _update_running(
    running_mean: Any, running_var: Any, mean: _Array, var: _Array, momentum: float, count: int
) -> None:
    """PyTorch's running-statistics update, in place, from float64 batch statistics."""
    with kernel_guard():
        numerics.update_running(running_mean, running_var, mean, var, float(momentum), float(count))


# ------------------------------------------------------- small helpers ---
def _parameters(weight: Any, bias: Any, channels: int, dtype: npt.DTypeLike) -> tuple[_Array, _Array]:
    """weight and bias as contiguous arrays; ones and zeros when absent."""
    weight = np.ones(channels, dtype) if weight is None else views.vector(weight)
    bias = np.zeros(channels, dtype) if bias is None else views.vector(bias)
    return weight, bias


def _scale(invstd: _Array, weight: _Array) -> _Array:
    """invstd * weight, rounded once to the statistics dtype, as every kernel does."""
    return (invstd.astype(np.float64) * weight.astype(np.float64)).astype(weight.dtype)


def _group_views(views_: Sequence[Any], groups: int) -> list[Sequence[Any]]:
    """Split kernel views (None stays None) into ``groups`` equal parts along their first axis.

    The batch axis is the outermost of both layouts (the channel axis is never
    0 with ghost batches), so the ghost batches of ``x`` are consecutive
    ranges of the view's first axis: ``outer`` of a SLAB, rows of ROWS.
    """
    if groups == 1:
        return [views_]
    size = next(v for v in views_ if v is not None).shape[0] // groups
    return [[None if v is None else v[g * size : (g + 1) * size] for v in views_] for g in range(groups)]


def _group_shape(view: _Array, groups: int) -> tuple[int, ...]:
    """The kernel shape of one ghost batch of ``view``."""
    return (view.shape[0] // groups, *tuple(view.shape[1:]))


def _optional_view(layout: str, array: _Array | None, axis: int) -> _Array | None:
    """A read-only kernel view of an optional input shaped like x (residual, forward output), or None."""
    return None if array is None else views.readonly(views.same_view(layout, array, axis))


def _normalize_with(
    x: _Array,
    axis: int,
    dtype: Any,
    mean: _Array,
    invstd: _Array,
    weight: Any,
    bias: Any,
    relu: bool = False,
    residual: _Array | None = None,
    override: Mapping[str, Any] | None = None,
) -> _Array:
    weight, bias = _parameters(weight, bias, x.shape[axis], dtype)
    layout, x_view = views.channel_view(x, axis)
    y, y_view, fresh = views.empty_like_layout(layout, x, axis)
    plan = cpu_plan.choose("normalize", layout, x_view.shape, x_view.itemsize, out_fresh=fresh, override=override)
    normalize_into(
        plan,
        x_view,
        views.vector(mean),
        _scale(invstd, weight),
        bias,
        y_view,
        _optional_view(layout, residual, axis),
        relu,
    )
    return y


# -------------------------------------------------------------- backend ---
class CpuSyncPieces(SyncPieces):
    """The CPU backend's pieces of synchronised batch norm (see :class:`fastbn.backends.SyncPieces`)."""

    @_ieee
    def local_moments(self, x: Any, axis: int) -> tuple[Any, Any]:
        channels = x.shape[axis]
        if x.size == 0:
            return np.zeros(channels), np.zeros(channels)
        layout, x_view = views.channel_view(x, axis)
        return stats(cpu_plan.choose("moments", layout, x_view.shape, x_view.itemsize), x_view)

    @_ieee
    def normalize_with_stats(
        self, x: Any, axis: int, dtype: Any, mean64: Any, var64: Any, weight: Any, bias: Any, eps: float
    ) -> tuple[Any, Any, Any]:
        mean = mean64.astype(dtype)
        invstd = (1.0 / np.sqrt(var64 + eps)).astype(dtype)
        if x.size == 0:
            return np.empty(x.shape, x.dtype), mean, invstd
        return _normalize_with(x, axis, dtype, mean, invstd, weight, bias), mean, invstd

    @_ieee
    def update_running(
        self, running_mean: Any, running_var: Any, mean64: Any, var64: Any, momentum: float, count: int
    ) -> None:
        _update_running(running_mean, running_var, mean64, var64, momentum, count)

    @_ieee
    def backward_sums(self, dy: Any, x: Any, axis: int, mean: Any) -> tuple[Any, Any]:
        channels = x.shape[axis]
        if x.size == 0:
            return np.zeros(channels), np.zeros(channels)
        layout, x_view = views.channel_view(x, axis)
        chosen = cpu_plan.choose("backward_sums", layout, x_view.shape, x_view.itemsize)
        return backward_reduce(chosen, views.readonly(views.same_view(layout, dy, axis)), x_view, views.vector(mean))

    @_ieee
    def backward_dx(
        self,
        dy: Any,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        sum_dy64: Any,
        dotp64: Any,
        count: int,
    ) -> Any:
        if x.size == 0:
            return np.empty(x.shape, x.dtype)
        weight, _ = _parameters(weight, None, x.shape[axis], dtype)
        istd = invstd.astype(np.float64)
        layout, x_view = views.channel_view(x, axis)
        dx, dx_view, fresh = views.empty_like_layout(layout, x, axis)
        chosen = cpu_plan.choose("backward_dx", layout, x_view.shape, x_view.itemsize, out_fresh=fresh)
        backward_elementwise_into(
            chosen,
            views.readonly(views.same_view(layout, dy, axis)),
            x_view,
            views.vector(mean),
            (sum_dy64 / count).astype(dtype),
            (dotp64 * istd * istd / count).astype(dtype),
            _scale(invstd, weight),
            dx_view,
        )
        return dx


class CpuBackend(Backend):
    """fastbn's operations on the Numba CPU kernels (see :class:`fastbn.backends.Backend`)."""

    name = "cpu"
    sync = CpuSyncPieces()

    def for_call(self, arrays: Sequence[tuple[str, Any]]) -> CpuBackend:
        return self

    def to_backend(self, obj: Any, name: str, *, read_only: bool = False) -> Any:
        return views.to_host(obj, name, read_only=read_only)

    def restorer(self, like: Any) -> Callable[[Any], Any]:
        return views.restorer(like)

    def from_host(self, array: Any) -> Any:
        return array

    @_ieee
    def forward_batch(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        momentum: float,
        update: bool,
        *,
        relu: bool = False,
        residual: Any = None,
        renorm: tuple[float, float] | None = None,
        groups: int = 1,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any, Any, Any]:
        """Normalise with batch statistics; update running stats if ``update``.

        With ghost batches (``groups > 1``), the running statistics are
        updated once per call, with the average over the groups of their
        means and of their unbiased variances (each group has the same count
        ``n``, so that average is ``n / (n - 1)`` times the average of the
        biased variances).  ``r`` and ``d`` are None without ``renorm``.
        """
        channels = x.shape[axis]
        weight, bias = _parameters(weight, bias, channels, dtype)
        layout, x_view = views.channel_view(x, axis)
        z_view = _optional_view(layout, residual, axis)
        y, y_view, fresh = views.empty_like_layout(layout, x, axis)
        chosen = cpu_plan.choose(
            "forward_train", layout, _group_shape(x_view, groups), x_view.itemsize, out_fresh=fresh, override=plan
        )
        ren = (
            None
            if renorm is None
            else (
                views.vector(running_mean),
                views.vector(running_var),
                float(renorm[0]),
                float(renorm[1]),
            )
        )
        r: _Array | None
        d: _Array | None
        if groups == 1:  # the common case, without the stacking and averaging over groups
            mean64, var64, invstd64, r, d = forward_train_into(
                chosen, x_view, weight, bias, eps, y_view, z_view, relu, ren
            )
            if update:
                _update_running(running_mean, running_var, mean64, var64, momentum, x.size // channels)
            if renorm is None:
                r = d = None
            return y, mean64.astype(dtype), invstd64.astype(dtype), r, d
        results = [
            forward_train_into(chosen, xg, weight, bias, eps, yg, zg, relu, ren)
            for xg, zg, yg in _group_views([x_view, z_view, y_view], groups)
        ]
        mean64, var64, invstd64, r, d = (np.stack(parts) for parts in zip(*results))
        if update:
            count = x.size // channels // groups
            _update_running(running_mean, running_var, mean64.mean(axis=0), var64.mean(axis=0), momentum, count)
        r, d = (None, None) if renorm is None else (r[0], d[0])
        return y, mean64.astype(dtype), invstd64.astype(dtype), r, d

    @_ieee
    def forward_eval(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        *,
        relu: bool = False,
        residual: Any = None,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        # A copy, so that later updates of running_mean cannot change `saved`.
        mean = np.array(running_mean, dtype=dtype, order="C")
        invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(dtype)
        y = _normalize_with(x, axis, dtype, mean, invstd, weight, bias, relu, residual, plan)
        return y, mean, invstd

    @_ieee
    def normalize(
        self,
        x: Any,
        axis: int,
        dtype: Any,
        mean: Any,
        var: Any,
        weight: Any,
        bias: Any,
        eps: float,
        *,
        plan: Mapping[str, Any] | None = None,
    ) -> Any:
        invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(dtype)
        return _normalize_with(x, axis, dtype, mean, invstd, weight, bias, override=plan)

    @_ieee
    def moments(self, x: Any, axis: int, dtype: Any, *, plan: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
        layout, x_view = views.channel_view(x, axis)
        chosen = cpu_plan.choose("moments", layout, x_view.shape, x_view.itemsize, override=plan)
        mean, var = stats(chosen, x_view)
        return mean.astype(dtype), var.astype(dtype)

    @_ieee
    def backward(
        self,
        dy: Any,
        x: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        batch_stats: bool,
        *,
        y: Any = None,
        dresidual: bool = False,
        r: Any = None,
        d: Any = None,
        groups: int = 1,
        plan: Mapping[str, Any] | None = None,
    ) -> tuple[Any, Any, Any, Any]:
        """Gradients; ``y`` (forward's ReLU output) masks dy in both passes, r and d are renorm's constants.

        With batch renormalization dx is the training formula with weight
        ``r * weight``, and ``dweight = r * dotp * invstd + d * sum_dy``.
        With ghost batches ``mean`` and ``invstd`` are ``(groups, C)``, and
        dweight and dbias are summed over the groups.
        """
        channels = x.shape[axis]
        weight, _ = _parameters(weight, None, channels, dtype)
        if r is not None:
            weight = (weight.astype(np.float64) * r.astype(np.float64)).astype(dtype)
        mean = views.vector(mean).reshape(groups, channels)
        invstd = views.vector(invstd).reshape(groups, channels)
        layout, x_view = views.channel_view(x, axis)
        dy_view = views.readonly(views.same_view(layout, dy, axis))
        m_view = _optional_view(layout, y, axis)
        dx, dx_view, fresh = views.empty_like_layout(layout, x, axis)
        dres, dres_view, _ = views.empty_like_layout(layout, x, axis) if dresidual else (None, None, False)
        chosen = cpu_plan.choose(
            "backward_train" if batch_stats else "backward_eval",
            layout,
            _group_shape(x_view, groups),
            x_view.itemsize,
            out_fresh=fresh,
            masked=y is not None,
            override=plan,
        )
        sum_dy = np.zeros(channels)
        dweight = np.zeros(channels)
        zeros = np.zeros(channels, dtype)
        for g, (dyg, mg, xg, dxg, dresg) in enumerate(
            _group_views([dy_view, m_view, x_view, dx_view, dres_view], groups)
        ):
            if batch_stats:
                group_dy, dotp = backward_train_into(chosen, dyg, xg, mean[g], invstd[g], weight, dxg, mg, dresg)
            else:
                # Eval: the statistics are constants, so dx = g * invstd * weight.
                group_dy, dotp = backward_reduce(chosen, dyg, xg, mean[g], mg)
                backward_elementwise_into(
                    chosen, dyg, xg, mean[g], zeros, zeros, _scale(invstd[g], weight), dxg, mg, dresg
                )
            sum_dy += group_dy
            dweight += dotp * invstd[g].astype(np.float64)
        if r is not None:
            dweight = dweight * r.astype(np.float64) + d.astype(np.float64) * sum_dy
        return dx, dweight.astype(dtype), sum_dy.astype(dtype), dres

    @_ieee
    def weighted_moments(self, x: Any, w: Any, axis: int) -> tuple[Any, Any, Any]:
        """Float64 ``(W, mean, var)`` per channel under weights ``w`` (x's shape, kernel dtype float32/float64)."""
        layout, x_view = views.channel_view(x, axis)
        w_view = views.readonly(views.same_view(layout, w, axis))
        with kernel_guard():
            if layout == ROWS:
                stats: tuple[Any, Any, Any] = weighted.weighted_stats_rows(
                    x_view, w_view, weighted.rows_per_task(x_view.shape[1])
                )
            else:
                stats = weighted.weighted_stats_slab(x_view, w_view)
        return stats

    @_ieee
    def weighted_forward(
        self,
        x: Any,
        w: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        bias: Any,
        eps: float,
        running_mean: Any,
        running_var: Any,
        momentum: float,
        update: bool,
        *,
        relu: bool,
        residual: Any,
    ) -> tuple[Any, Any, Any, Any]:
        """Normalise everywhere with the statistics under weights ``w``; returns y, mean, invstd and W.

        The running variance takes the unbiased weighted variance ``var * W / (W - 1)``; a channel with
        ``W <= 1`` carries no such estimate and keeps its running statistics.
        """
        wsum, mean64, var64 = self.weighted_moments(x, w, axis)
        invstd64 = 1.0 / np.sqrt(var64 + eps)
        mean, invstd = mean64.astype(dtype), invstd64.astype(dtype)
        y = _normalize_with(x, axis, dtype, mean, invstd, weight, bias, relu, residual)
        if update:
            learn = wsum > 1
            # var * (W / (W - 1)), the correction first: var * W overflows where the result need not; and
            # where var * correction alone overflows, (m * var) * correction (as numerics._moved_var).
            correction = np.where(learn, wsum, 2.0) / np.where(learn, wsum - 1.0, 1.0)
            with np.errstate(over="ignore"):
                unbiased = var64 * correction
                m = float(momentum)
                step = np.where(np.isinf(unbiased) & np.isfinite(var64), (m * var64) * correction, m * unbiased)
            new_mean = (1.0 - m) * running_mean.astype(np.float64) + m * mean64
            new_var = (1.0 - m) * running_var.astype(np.float64) + step
            running_mean[learn] = new_mean[learn].astype(running_mean.dtype)
            running_var[learn] = new_var[learn].astype(running_var.dtype)
        return y, mean, invstd, wsum

    @_ieee
    def weighted_backward(
        self,
        dy: Any,
        x: Any,
        w: Any,
        wsum: Any,
        axis: int,
        dtype: Any,
        weight: Any,
        mean: Any,
        invstd: Any,
        *,
        y: Any = None,
        dresidual: bool = False,
    ) -> tuple[Any, Any, Any, Any]:
        """Training-mode gradients under weights ``w`` (see :mod:`fastbn.backends.cpu.weighted`)."""
        channels = x.shape[axis]
        weight, _ = _parameters(weight, None, channels, dtype)
        layout, x_view = views.channel_view(x, axis)
        dy_view = views.readonly(views.same_view(layout, dy, axis))
        w_view = views.readonly(views.same_view(layout, w, axis))
        m_view = _optional_view(layout, y, axis)
        dx, dx_view, fresh = views.empty_like_layout(layout, x, axis)
        dres, dres_view, _ = views.empty_like_layout(layout, x, axis) if dresidual else (None, None, False)
        chosen = cpu_plan.choose(
            "backward_train", layout, x_view.shape, x_view.itemsize, out_fresh=fresh, masked=y is not None
        )
        mean = views.vector(mean)
        sum_dy, dotp = backward_reduce(chosen, dy_view, x_view, mean, m_view)
        s = invstd.astype(np.float64)
        some = wsum > 0
        safe = np.where(some, wsum, 1.0)
        a = np.where(some, sum_dy / safe, 0.0)
        b = np.where(some, s * s * dotp / safe, 0.0)
        scale = s * weight.astype(np.float64)
        if y is not None:
            # The ReLU's mask: dx is computed from g = dy where forward's output is > 0 (the sums above
            # take the mask from m_view).  Applied on the caller's arrays, whose dtype compares as numbers.
            dy_view = views.readonly(views.same_view(layout, np.where(y > 0, dy, np.zeros((), dy.dtype)), axis))
        if dres_view is not None:
            dres_view[...] = dy_view
        kernel_ = weighted.weighted_dx_rows if layout == ROWS else weighted.weighted_dx_slab
        with kernel_guard():
            kernel_(dy_view, x_view, w_view, mean.astype(np.float64), a, b, scale, dx_view)
        return dx, (dotp * s).astype(dtype), sum_dy.astype(dtype), dres

    @_ieee
    def fold(
        self,
        layer_weight: Any,
        layer_bias: Any,
        running_mean: Any,
        running_var: Any,
        weight: Any,
        bias: Any,
        eps: float,
        axis: int,
    ) -> tuple[Any, Any]:
        """``(s * W, s * (c - mean) + bias)`` with ``s = weight * invstd``, in float64, rounded once.

        The folded weight keeps ``layer_weight``'s memory order.  A bfloat16
        layer is rounded through float32 (ml_dtypes' conversion from float64),
        so within ``2^-8 (1 + 2^-16)`` relative rather than ``2^-8``.
        """
        channels = layer_weight.shape[axis]
        scale = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        if weight is not None:
            scale = scale * weight.astype(np.float64)
        shape = [1] * layer_weight.ndim
        shape[axis] = channels
        folded_weight = (layer_weight.astype(np.float64, order="K") * scale.reshape(shape)).astype(
            layer_weight.dtype, order="K"
        )
        c = np.zeros(channels) if layer_bias is None else layer_bias.astype(np.float64)
        mean = running_mean.astype(np.float64)
        folded_bias = scale * (c - mean)
        # c - mean overflows float64 where both are near its limit (and of opposite signs) while the scaled
        # difference need not: there, each is scaled first (a rounding more, on those channels only).
        redo = np.isinf(folded_bias) & np.isfinite(c) & np.isfinite(mean) & np.isfinite(scale)
        if redo.any():
            folded_bias = np.where(redo, scale * c - scale * mean, folded_bias)
        if bias is not None:
            folded_bias = folded_bias + bias.astype(np.float64)
        return folded_weight, folded_bias.astype(layer_weight.dtype)


#: The CPU backend, as :func:`fastbn.backends.load` returns it.
BACKEND = CpuBackend()
