"""The CUDA backend's operations, on validated GPU arrays.

:class:`CudaBackend` implements :class:`fastbn.backends.Backend` for arrays
exposing ``__cuda_array_interface__`` (numba device arrays, CuPy arrays,
PyTorch CUDA tensors).  Each operation views its input in a kernel layout
(:mod:`fastbn.backends.cuda.views`), allocates outputs on the device and
launches the kernels through :mod:`fastbn.backends.cuda.plan`.  Nothing goes
to the host between the launches: the per-channel arithmetic runs in
one-thread-per-channel kernels (:mod:`fastbn.backends.cuda.numerics`), and
results (``saved.mean`` and ``saved.invstd`` included) stay on the device.

Results are numba device arrays; :meth:`CudaBackend.restorer` turns them
into the caller's kind, without copying.  Every host-side check that can
fail runs before the first launch, so an error leaves every buffer
untouched.

Statistics are accumulated in float32 for float16 and float32 input (float64
for float64) within a block, on values shifted by a per-channel pivot; the
blocks' partials are merged per channel in float64 and rounded once to the
statistics dtype.  (The CPU backend accumulates float32 and float64 input in float64, and
float16 and bfloat16 in float32 blocks of at most 256 elements.)

Synchronised batch norm has no CUDA pieces yet (``sync`` is None, so
``process_group`` is refused before any launch), and the private ``plan``
override is the CPU backend's only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fastbn.backends import Backend
from fastbn.backends.cuda import context, numerics, target, views
from fastbn.backends.cuda import plan as launch

__all__ = ["BACKEND", "CudaBackend"]


def _check_no_plan(plan: Mapping[str, Any] | None) -> None:
    if plan is not None:
        raise ValueError("_plan: only the CPU backend takes a plan override")


def _parameter(value: Any, fallback: Any) -> tuple[Any, bool]:
    """A per-channel array and whether it was given (kernels take a dummy array and a flag)."""
    return (fallback, False) if value is None else (value, True)


def _statistics(layout: views.Layout, x_flat: Any, groups: int = 1) -> tuple[Any, Any, Any, Any]:
    """Launch the statistics reduction; return the float64 partials and pivots (per group and channel)."""
    slots = groups * layout.channels
    reduction = launch.ReductionPlan(layout.rows, layout.outer, layout.channels, layout.inner, groups)
    workspace = context.device_array((3 * reduction.splits + 1) * slots, np.float64)
    partial_count, partial_mean, partial_m2, pivot = views.split(
        workspace, slots, reduction.splits, reduction.splits, reduction.splits, 1
    )
    launch.stats(
        reduction, layout.rows, x_flat, layout.channels, layout.inner, partial_count, partial_mean, partial_m2, pivot
    )
    return partial_count, partial_mean, partial_m2, pivot


def _normalize_given(
    x: Any,
    axis: int,
    dtype: Any,
    mean: Any,
    var: Any,
    weight: Any,
    bias: Any,
    eps: float,
    relu: bool = False,
    residual: Any = None,
) -> tuple[Any, Any, Any]:
    """Normalise with given statistics: ``(y, saved_mean, saved_invstd)``, saved_mean a copy of ``mean``."""
    layout = views.Layout(x, axis)
    residual_access = None if residual is None else layout.same(residual, "residual")
    channels = layout.channels
    x_flat = layout.x_access.flat()
    z_flat = x_flat if residual_access is None else residual_access.flat()  # not read without a residual
    coefficients = context.device_array(4 * channels, dtype)
    saved_mean, saved_invstd, scale, shift = views.split(coefficients, channels, 1, 1, 1, 1)
    weight, has_weight = _parameter(weight, scale)
    bias, has_bias = _parameter(bias, shift)
    launch.launch_per_channel(
        numerics.normalize_coefficients,
        channels,
        mean,
        var,
        float(eps),
        weight,
        has_weight,
        bias,
        has_bias,
        saved_mean,
        saved_invstd,
        scale,
        shift,
    )
    y, y_flat = layout.empty(x.dtype)
    launch.normalize_flat(
        x_flat,
        z_flat,
        channels,
        layout.inner,
        1,
        saved_mean,
        scale,
        shift,
        y_flat,
        relu=relu,
        residual=residual is not None,
    )
    return y, saved_mean, saved_invstd


class CudaBackend(Backend):
    """The CUDA backend: kernels of :mod:`fastbn.backends.cuda`, on device arrays."""

    name = "cuda"
    sync = None  # synchronised batch norm is CPU-only so far

    # -- the caller's arrays -------------------------------------------------
    def for_call(self, arrays: Sequence[tuple[str, Any]]) -> Backend:
        """This backend, running on the input's device and stream with its framework's allocator.

        See :func:`fastbn.backends.cuda.context.for_call` (which raises
        ValueError for an argument on another device than the input).
        """
        return context.Bound(self, context.for_call(arrays))

    def to_backend(self, obj: Any, name: str, *, read_only: bool = False) -> Any:
        """``obj`` as a numba device array, without a copy (see :func:`fastbn.backends.cuda.views.to_device`).

        ``read_only`` changes nothing here: a device array is never a copy.
        """
        return views.to_device(obj, name)

    def restorer(self, like: Any) -> Callable[[Any], Any]:
        """A function turning device arrays into ``like``'s kind (see :func:`fastbn.backends.cuda.views.restorer`)."""
        return views.restorer(like)

    def from_host(self, array: Any) -> Any:
        """A device copy of the host NumPy array ``array``."""
        array = np.ascontiguousarray(array)
        device = context.device_array(array.shape, array.dtype)
        if array.size:  # an empty batch's output: nothing to copy
            device.copy_to_device(array, stream=context.launch_stream())
        return device

    # -- the public operations -----------------------------------------------
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
        """Normalise with batch statistics; update running stats (in place, on the device) if ``update``.

        Parameters
        ----------
        relu : bool
            Apply ReLU to the output (NaN passes through), in the same pass.
        residual : device array or None
            Added to the normalised output before the activation; x's shape
            and dtype, any strides.
        renorm : (float, float) or None
            Batch renormalization's (rmax, dmax): r and d come from the
            running statistics as they were before this call's update (G must
            be 1).
        groups : int
            Ghost batch norm: statistics per group of ``x.shape[0] // groups``
            consecutive samples; the running statistics are updated once,
            with the averages over groups of the group means and unbiased
            variances.
        plan : None
            Must be None: only the CPU backend takes a plan override.

        Returns
        -------
        y, mean, invstd, r, d
            Output like ``x`` (same memory order); the statistics used, in
            ``dtype``, shape (C,), or (G, C) when ``groups > 1``; batch
            renormalization's r and d, shape (C,), or None without
            ``renorm``.  All device arrays.
        """
        _check_no_plan(plan)
        layout = views.Layout(x, axis)
        residual_access = None if residual is None else layout.same(residual, "residual")
        channels = layout.channels
        x_flat = layout.x_access.flat()
        z_flat = x_flat if residual_access is None else residual_access.flat()  # not read without a residual
        partials = _statistics(layout, x_flat, groups)
        scratch = context.device_array(2 * channels, np.float64)
        mean64, var64 = views.split(scratch, channels, 1, 1)
        renorm_counts = () if renorm is None else (1, 1)
        coefficients = context.device_array((4 * groups + len(renorm_counts)) * channels, dtype)
        saved_mean, saved_invstd, scale, shift, *renorm_out = views.split(
            coefficients, channels, groups, groups, groups, groups, *renorm_counts
        )
        weight, has_weight = _parameter(weight, scale)
        bias, has_bias = _parameter(bias, shift)
        if renorm is None:
            # (renorm, running_mean, running_var, rmax, dmax, r, d): the arrays
            # are neither read nor written without renorm, any of the type will do.
            renorm_args = (False, scale, scale, 1.0, 0.0, scale, scale)
            r = d = None
        else:
            r, d = renorm_out
            renorm_args = (True, running_mean, running_var, float(renorm[0]), float(renorm[1]), r, d)
        launch.launch_per_channel(
            numerics.forward_coefficients,
            channels,
            *partials,
            float(eps),
            weight,
            has_weight,
            bias,
            has_bias,
            *renorm_args,
            mean64,
            var64,
            saved_mean,
            saved_invstd,
            scale,
            shift,
        )
        if update:
            count = layout.outer * layout.inner // groups
            launch.launch_per_channel(
                numerics.update_running,
                channels,
                running_mean,
                running_var,
                mean64,
                var64,
                float(momentum),
                count / (count - 1.0),
            )
        y, y_flat = layout.empty(x.dtype)
        launch.normalize_flat(
            x_flat,
            z_flat,
            channels,
            layout.inner,
            groups,
            saved_mean,
            scale,
            shift,
            y_flat,
            relu=relu,
            residual=residual is not None,
        )
        return y, views.grouped(saved_mean, groups, channels), views.grouped(saved_invstd, groups, channels), r, d

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
        """Normalise with the running statistics; returns ``(y, mean, invstd)``.

        ``relu`` and ``residual`` as in :meth:`forward_batch`.  ``mean`` is a
        copy, so later updates of ``running_mean`` cannot change ``saved``.
        """
        _check_no_plan(plan)
        return _normalize_given(x, axis, dtype, running_mean, running_var, weight, bias, eps, relu, residual)

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
        """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel."""
        _check_no_plan(plan)
        return _normalize_given(x, axis, dtype, mean, var, weight, bias, eps)[0]

    def moments(self, x: Any, axis: int, dtype: Any, *, plan: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
        """Per-channel mean and biased variance, in ``dtype``, as device arrays."""
        _check_no_plan(plan)
        layout = views.Layout(x, axis)
        channels = layout.channels
        partials = _statistics(layout, layout.x_access.flat())
        out = context.device_array(2 * channels, dtype)
        mean, var = views.split(out, channels, 1, 1)
        launch.launch_per_channel(numerics.stats_merge, channels, *partials, mean, var)
        return mean, var

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
        """Gradients ``(dx, dweight, dbias, dres)``; the training formula if ``batch_stats``.

        Parameters
        ----------
        mean, invstd : GPU arrays
            The saved statistics, converted here (a host array is rejected
            naming ``saved.mean`` or ``saved.invstd``).
        y : device array or None
            Forward's output when forward applied ReLU: the gradient passes
            only where y > 0 (y NaN blocks it), in both passes.
        dresidual : bool
            Also return ``dres``, the gradient of forward's residual: the
            masked gradient (dy itself without ``y``), a new array like
            ``dx``.
        r, d : GPU arrays or None
            Batch renormalization's r and d from forward: dx uses the weight
            r * w, ``dweight = r * dotp * invstd + d * sum_dy``.
        groups : int
            Ghost batch norm: ``mean`` and ``invstd`` are (G, C) and each
            group of samples uses its own row; dweight and dbias are summed
            over groups.
        plan : None
            Must be None: only the CPU backend takes a plan override.

        Returns
        -------
        dx, dweight, dbias, dres
            dres is None unless ``dresidual``.
        """
        _check_no_plan(plan)
        mean_access = views.vector(views.to_device(mean, "saved.mean"), "saved.mean")
        invstd_access = views.vector(views.to_device(invstd, "saved.invstd"), "saved.invstd")
        r = views.to_device(r, "saved.r")
        d = views.to_device(d, "saved.d")
        layout = views.Layout(x, axis)
        dy_access = layout.same(dy, "dy")
        y_access = None if y is None else layout.same(y, "y")
        channels = layout.channels
        mean, invstd = mean_access.flat(), invstd_access.flat()
        x_flat = layout.x_access.flat()
        dy_flat = dy_access.flat()
        y_flat = dy_flat if y_access is None else y_access.flat()  # not read without y
        slots = groups * channels
        reduction = launch.ReductionPlan(layout.rows, layout.outer, channels, layout.inner, groups)
        workspace = context.device_array(2 * reduction.splits * slots, np.float64)
        partial_sum_dy, partial_dotp = views.split(workspace, slots, reduction.splits, reduction.splits)
        out = context.device_array((2 + 3 * groups) * channels, dtype)
        dweight, dbias, mean_dy, k, scale = views.split(out, channels, 1, 1, groups, groups, groups)
        weight, has_weight = _parameter(weight, scale)
        renorm = r is not None
        dx, dx_flat = layout.empty(x.dtype)
        dres, dres_flat = layout.empty(x.dtype) if dresidual else (None, dx_flat)  # not written without dresidual
        # Eval (constant statistics): dx = g * invstd * weight does not need the
        # sums, so the reduction writes it as it reads dy and x, and the
        # elementwise pass is skipped: three passes over memory, not five.
        eval_dx = None
        if not batch_stats:
            eval_dx = (invstd, weight, has_weight, renorm, r if renorm else scale, dx_flat, dres_flat, dresidual)
        launch.backward_reduce(
            reduction,
            layout.rows,
            dy_flat,
            x_flat,
            y_flat,
            mean,
            channels,
            layout.inner,
            partial_sum_dy,
            partial_dotp,
            masked=y is not None,
            eval_dx=eval_dx,
        )
        launch.launch_per_channel(
            numerics.backward_coefficients,
            channels,
            partial_sum_dy,
            partial_dotp,
            invstd,
            weight,
            has_weight,
            layout.outer * layout.inner // groups,
            bool(batch_stats),
            renorm,
            r if renorm else scale,
            d if renorm else scale,
            dweight,
            dbias,
            mean_dy,
            k,
            scale,
        )
        if batch_stats:
            launch.backward_elementwise_flat(
                dy_flat,
                x_flat,
                y_flat,
                channels,
                layout.inner,
                groups,
                mean,
                mean_dy,
                k,
                scale,
                dx_flat,
                dres_flat,
                masked=y is not None,
                write_dres=dresidual,
            )
        return dx, dweight, dbias, dres

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
        """Batch norm folded into the layer before it, with the normalize kernels.

        ``s * W`` is normalize of ``W`` (channel axis ``axis``) with mean 0,
        and ``s * (c - running_mean) + bias`` is normalize of ``c`` seen as a
        ``(1, C)`` batch; both computed in the kernels' compute type (float32
        for float16 and float32 layers) and rounded once to the layer's dtype.
        """
        channels = layer_weight.shape[axis]
        dtype = np.dtype(running_var.dtype)
        folded_weight = _normalize_given(
            layer_weight, axis, dtype, context.zeros(channels, dtype), running_var, weight, None, eps
        )[0]
        if layer_bias is None:
            layer_bias = context.zeros(channels, layer_weight.dtype)
        as_row = target.view(layer_bias, (1, channels), (0, np.dtype(layer_bias.dtype).itemsize))
        folded_bias = _normalize_given(as_row, 1, dtype, running_mean, running_var, weight, bias, eps)[0]
        return folded_weight, target.view(folded_bias, (channels,), (np.dtype(folded_bias.dtype).itemsize,))


#: The backend object :func:`fastbn.backends.load` returns.
BACKEND = CudaBackend()
