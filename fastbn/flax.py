"""Flax (linen): :class:`BatchNorm`, a drop-in for ``flax.linen.BatchNorm`` that runs fastbn's kernels.

The module takes ``flax.linen.BatchNorm``'s arguments, with their defaults
and meanings, and keeps its variables exactly as Flax does: ``params``
``{'scale', 'bias'}`` and ``batch_stats`` ``{'mean', 'var'}``, of the feature
shape, so variables (checkpoints) of one load into the other and training
code carries over unchanged.    How Flax's conventions map onto fastbn's:

==============================  ===============================================
Flax                            fastbn
==============================  ===============================================
``axis`` (int or tuple)         the channel axis; several feature axes are
                                flattened into one channel axis (a reshape, or
                                a transpose where they are not adjacent) and
                                restored afterwards
``use_running_average=False``   ``training=True``: batch statistics
``use_running_average=True``    ``training=False`` with the running statistics
``momentum=0.99``               PyTorch's ``momentum=0.01``: the update
                                ``ra = momentum * ra + (1 - momentum) * batch``
                                is Flax's, done here in jax.numpy
``batch_stats['var']``          the BIASED batch variance (Flax's); fastbn's own
                                running variance is the unbiased one
``epsilon``                     ``eps``
``scale``, ``bias``             ``weight``, ``bias``
``use_fast_variance``           accepted and ignored: fastbn never computes
                                ``E[x^2] - E[x]^2`` (two passes, or blocks
                                merged with Chan's formula)
``axis_name``                   local fastbn moments, ``lax.all_gather`` of
                                ``(count, mean, var)`` and an exact merge
                                (:func:`fastbn.jax.merge_moments`), where Flax
                                averages ``E[x]`` and ``E[x^2]`` with equal
                                weights
==============================  ===============================================

Importing this module imports flax; ``import fastbn`` alone never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastbn._frameworks import missing_dependency

try:
    import flax.linen as nn
except ModuleNotFoundError as exc:
    raise missing_dependency("fastbn.flax", "Flax", "flax", exc) from exc
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes, initializers

from fastbn._jax_stats import _flat, _to3, biased_variance, check_static_momentum
from fastbn._validate import stats_dtype
from fastbn.conventions import FRAMEWORKS
from fastbn.jax import batch_norm, merge_moments, moments, normalize

__all__ = ["BatchNorm"]


def _feature_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    items: tuple[Any, ...]
    try:
        items = (axis,) if isinstance(axis, (int, np.integer, bool, np.bool_)) else tuple(axis)
    except TypeError:
        raise TypeError(f"axis: expected an int or a tuple of ints, got {type(axis).__name__}") from None
    result: set[int] = set()
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"axis: expected an int or a tuple of ints, got an element {item!r}")
        if not -ndim <= item < ndim:
            raise ValueError(f"axis: {int(item)} is out of range for an input of {ndim} dimensions")
        result.add(int(item) % ndim)
    if not result:
        raise ValueError("axis: expected at least one feature axis")
    if len(result) == ndim:
        raise ValueError(f"axis: {tuple(items)} leaves no axis of the {ndim}-dimensional input to reduce over")
    return tuple(sorted(result))


def _restore(y3: Any, flat: Any, shape: tuple[int, ...]) -> Any:
    """Undo :func:`fastbn._jax_stats._to3`: back to x's shape (and order)."""
    if flat.perm is None:
        return y3.reshape(shape)
    permuted = tuple(shape[i] for i in flat.perm)
    return jnp.transpose(y3.reshape(permuted), tuple(int(i) for i in np.argsort(flat.perm)))


class BatchNorm(nn.Module):
    """Batch normalization with ``flax.linen.BatchNorm``'s interface, on fastbn's kernels.

    Attributes
    ----------
    use_running_average : bool, optional
        Normalise with the stored ``batch_stats`` instead of the batch's
        statistics; may instead be given to ``__call__`` (exactly one of the
        two, as ``flax.linen.merge_param`` requires).
    axis : int or tuple of int, default -1
        The feature axis or axes: one scale, bias and pair of statistics per
        feature; statistics are reduced over every other axis.
    momentum : float, default 0.99
        Flax's decay: ``ra = momentum * ra + (1 - momentum) * batch``, in [0, 1].
    epsilon : float, default 1e-5
        Positive, added to the variance.
    dtype : dtype, optional
        The output dtype; default Flax's: the promotion of the input's and
        the parameters' dtypes.
    param_dtype : dtype, default float32
        The dtype of ``scale`` and ``bias``.
    use_bias, use_scale : bool, default True
        Learn ``bias`` / ``scale``.
    bias_init, scale_init : initializer
        Default zeros and ones.
    axis_name : str, optional
        Synchronise the batch statistics over this named axis (``pmap``,
        ``shard_map``, ``vmap`` with ``axis_name``): each member's fastbn
        moments are gathered with ``lax.all_gather`` and merged exactly,
        weighted by their counts (which differ with a ``mask``).  Not used
        when initialising, as in Flax.
    axis_index_groups : sequence, optional
        Groups of axis indices to synchronise within, passed to
        ``lax.all_gather`` (which supports them under ``pmap``).
    use_fast_variance : bool, default True
        Accepted for compatibility and ignored: fastbn's variance is always
        the two-pass (or Chan-merged) one, never ``E[x^2] - E[x]^2``.
    force_float32_reductions : bool, default True
        Only True (Flax's default) is supported: statistics and ``batch_stats``
        are float32 (float64 for float64 input).

    Notes
    -----
    The normalised output and its gradient come from fastbn: in training one
    :func:`fastbn.jax.batch_norm` pass yields ``y`` and the batch mean and
    variance (the biased variance is recovered from fastbn's unbiased one as
    ``var * (n - 1) / n``, one rounding more than Flax's own, well below the
    float32 error of Flax's ``E[x^2] - E[x]^2``); with ``mask`` or
    ``axis_name``, :func:`fastbn.jax.moments` and :func:`fastbn.jax.normalize`
    with the merge in between.  The running-average update is Flax's
    expression.  One value per feature in training is a ValueError (fastbn
    follows PyTorch there; Flax returns ``bias``).  Inputs of a precision
    below the output dtype (float16 input, float32 parameters) are widened
    first (exactly), so ``y`` is rounded once, to the output dtype, as Flax's.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from fastbn.flax import BatchNorm
    >>> x = jax.random.normal(jax.random.key(0), (8, 4))
    >>> bn = BatchNorm(use_running_average=False)
    >>> variables = bn.init(jax.random.key(1), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> jax.tree_util.tree_map(jnp.shape, updates)
    {'batch_stats': {'mean': (4,), 'var': (4,)}}
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = FRAMEWORKS["flax"].momentum  # 0.99, Flax's default (fastbn.conventions)
    epsilon: float = FRAMEWORKS["flax"].eps  # 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Any, use_running_average: bool | None = None, *, mask: Any = None) -> Any:
        """Normalise ``x``; in training (``batch_stats`` mutable) update the running statistics.

        Parameters
        ----------
        x : jax.Array
            float16, bfloat16, float32 or float64 input.
        use_running_average : bool, optional
            As the attribute (give it in one place only).
        mask : jax.Array of bool, optional
            Broadcastable to ``x``: the batch statistics are over the True
            positions only (the output is computed everywhere).

        Returns
        -------
        jax.Array
            The shape of ``x``, in the output dtype (see ``dtype``).
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if not isinstance(use_running_average, (bool, np.bool_)):
            raise TypeError(f"use_running_average: expected True or False, got {type(use_running_average).__name__}")
        x = jnp.asarray(x)
        if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
            raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
        # Flax's decay, used only in the jax.numpy update below: NumPy and JAX scalars, and (as in
        # Flax) a traced one, which cannot be range-checked.
        momentum = self.momentum if isinstance(self.momentum, jax.core.Tracer) else check_static_momentum(self.momentum)
        if not self.force_float32_reductions:
            raise ValueError("force_float32_reductions: only True is supported (statistics are float32 or wider)")
        shape = tuple(x.shape)
        features = _feature_axes(self.axis, x.ndim)
        feature_shape = tuple(shape[i] for i in features)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape)
        for name, stat in (("mean", ra_mean), ("var", ra_var)):
            if (got := tuple(jnp.shape(stat.value))) != feature_shape:
                raise ValueError(f"batch_stats['{name}']: expected the feature shape {feature_shape}, got {got}")
        scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None
        args = [x] + [p for p in (scale, bias) if p is not None]
        out_dtype = dtypes.canonicalize_dtype(*args, dtype=self.dtype)
        # Widen (exactly) an input below the output's precision, so y is rounded once.
        xc = x.astype(jnp.promote_types(x.dtype, out_dtype))
        sdtype = stats_dtype(np.dtype(xc.dtype))
        flat = _flat(shape, features)
        x3 = _to3(xc, flat)
        channels = flat.shape3[1]
        weight3 = None if scale is None else jnp.asarray(scale).reshape(channels).astype(sdtype)
        bias3 = None if bias is None else jnp.asarray(bias).reshape(channels).astype(sdtype)

        if use_running_average:
            y3, _ = batch_norm(
                x3,
                weight3,
                bias3,
                running_mean=jnp.asarray(ra_mean.value).reshape(channels).astype(sdtype),
                running_var=jnp.asarray(ra_var.value).reshape(channels).astype(sdtype),
                training=False,
                eps=self.epsilon,
                axis=1,
            )
        else:
            sync = self.axis_name is not None and not self.is_initializing()
            if mask is None and not sync:
                # One fastbn pass: y, and (momentum 1, zero running statistics)
                # the batch mean and unbiased variance as the "running" ones.
                zeros = jnp.zeros((channels,), sdtype)
                y3, running = batch_norm(
                    x3, weight3, bias3, running_mean=zeros, running_var=zeros, momentum=1.0, eps=self.epsilon, axis=1
                )
                assert running is not None
                mean, var = running[0], biased_variance(running[1], x3, (0, 2), flat.shape3[0] * flat.shape3[2])
            else:
                mean, var = self._statistics(x3, mask, flat, shape, sync, sdtype)
                y3 = normalize(x3, mean, var, weight3, bias3, eps=self.epsilon, axis=1)
            if not self.is_initializing():
                # Flax's statistics dtype (the input's, or ``dtype``, and at least float32), so
                # batch_stats keep Flax's dtypes: float32 for a float32 input even with float64
                # parameters (a lax.scan carry must not change dtype).
                flax_dtype = jnp.promote_types(x.dtype if self.dtype is None else self.dtype, jnp.float32)
                mean, var = mean.astype(flax_dtype), var.astype(flax_dtype)
                m = momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(feature_shape)
                ra_var.value = m * ra_var.value + (1 - m) * var.reshape(feature_shape)
        return _restore(y3, flat, shape).astype(out_dtype)

    def _statistics(self, x3: Any, mask: Any, flat: Any, shape: tuple[int, ...], sync: bool, sdtype: Any) -> Any:
        """Batch mean and biased variance (K,): fastbn's local moments, merged over ``axis_name`` when syncing."""
        weights3 = None
        channels = flat.shape3[1]
        if mask is not None:
            mask = jnp.asarray(mask)
            try:
                full = jnp.broadcast_to(mask, shape).astype(jnp.bool_)
            except ValueError:
                raise ValueError(
                    f"mask: shape {tuple(mask.shape)} does not broadcast to the input's shape {shape}"
                ) from None
            weights3 = _to3(full.astype(sdtype), flat)
            # Masked-out positions do not count, whatever they hold (Flax's
            # ``mean(where=mask)``: a NaN there must not reach the sums).
            x3 = jnp.where(weights3 > 0, x3, jnp.zeros((), x3.dtype))
        mean, var = moments(x3, axes=(0, 2), weights=weights3)
        if not sync:
            return mean, var
        if weights3 is None:
            count = jnp.full((channels,), flat.shape3[0] * flat.shape3[2], sdtype)
        else:
            count = jnp.sum(weights3, axis=(0, 2))
        counts, means, variances = jax.lax.all_gather(
            (count, mean, var), self.axis_name, axis_index_groups=self.axis_index_groups
        )
        _, mean, var = merge_moments(counts, means, variances)
        return mean, var
