"""Keras 3 adapter: :class:`BatchNormalization`, Keras's batch-norm layer on fastbn's kernels.

The layer takes ``keras.layers.BatchNormalization``'s arguments, defaults and
conventions (``momentum=0.99`` weighting the old moving value, ``epsilon=1e-3``,
a biased moving variance, ``training=None`` meaning inference,
``trainable=False`` meaning inference, ``mask``), and holds the same weights
under the same names in the same order (``gamma``, ``beta``,
``moving_mean``, ``moving_variance``): ``set_weights(keras_layer.get_weights())``
works both ways, and so does a ``.weights.h5`` file.  It is registered as a
Keras serializable (``"fastbn>BatchNormalization"``), so a saved ``.keras``
model that uses it loads wherever fastbn is installed.

The normalised output and its gradients come from fastbn's kernels:

* JAX backend: :func:`fastbn.jax.batch_norm` (``pure_callback`` and
  ``custom_vjp``; works under ``jax.jit``, Keras's default there);
* PyTorch backend: :func:`fastbn.torch.batch_norm` (custom operators with
  autograd);
* TensorFlow backend: :func:`fastbn.forward` and :func:`fastbn.backward`
  through ``tf.numpy_function`` and ``tf.custom_gradient`` (graph mode works;
  XLA cannot compile a host callback, so the layer sets
  ``supports_jit = False`` and ``compile(jit_compile="auto")`` leaves XLA off).

The moving statistics are updated with Keras's own formula, from the batch
mean and biased batch variance of the same fastbn call (the adapters return
the unbiased variance ``var * n / (n - 1)`` as the new running variance of a
``momentum=1`` update from zeros; the layer scales it back by ``(n - 1) / n``, one extra rounding).

``mask`` (Keras's: the input's shape without the feature axis) restricts the
training statistics to the unmasked positions and normalises every position:
through the adapters' differentiable ``moments(mask=)`` and ``normalize`` on
JAX and PyTorch, through :func:`fastbn.forward` / :func:`fastbn.backward` with
the mask as ``weights`` on TensorFlow.  ``renorm`` is Keras 3's batch
renormalization, with its three extra weights: fastbn normalises, and the
per-channel correction ``r``, ``d`` (constants for the gradient, clipped as
``renorm_clipping`` says) is applied elementwise.

Importing this module imports keras (which fixes its backend: ``KERAS_BACKEND``);
``import fastbn`` alone never does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastbn._frameworks import missing_dependency
from fastbn._keras_compute import _INFER, _TRAIN, _masked

try:
    import keras  # type: ignore[import-untyped]  # keras has no annotations (no py.typed)
except ModuleNotFoundError as exc:
    raise missing_dependency("fastbn.keras", "Keras", "keras", exc) from exc
import numpy as np
from keras import ops

from fastbn.conventions import FRAMEWORKS

__all__ = ["SUPPORTED_BACKENDS", "BatchNormalization"]

SUPPORTED_BACKENDS = ("jax", "torch", "tensorflow")  # the Keras backends the layer runs on

_REDUCED = ("float16", "bfloat16")  # fastbn takes these directly, with float32 statistics
_RENORM_KEYS = ("rmax", "rmin", "dmax")
_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def _backend() -> str:
    name: str = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"fastbn.keras.BatchNormalization runs on the Keras backends {', '.join(SUPPORTED_BACKENDS)}; "
            f"the current backend is {name!r} (set KERAS_BACKEND before importing keras)"
        )
    return name


def _check_axis(axis: Any) -> int | list[int]:
    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

    if is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(is_int(a) for a in axis):
        return [int(a) for a in axis]
    raise TypeError(f"axis: expected an int or a non-empty list of ints, got {axis!r}")


def _check_real(value: Any, name: str, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < low or number > high or (open_low and number == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}: expected a finite number in {bracket}{low}, {high}], got {value!r}")
    return number


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _check_renorm(renorm: Any, clipping: Any, momentum: Any) -> tuple[bool, dict[str, float] | None, float]:
    """Keras's renorm arguments, checked as Keras checks them (its messages), plus types and ranges."""
    renorm = _check_bool(renorm, "renorm")
    renorm_momentum = _check_real(momentum, "renorm_momentum", 0.0, 1.0)
    if not renorm:
        return False, clipping, renorm_momentum
    clipping = {} if clipping is None else clipping
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping: expected a dict with keys among {list(_RENORM_KEYS)}, got {clipping!r}")
    if set(clipping) - set(_RENORM_KEYS):
        raise ValueError(
            f"renorm_clipping: Received invalid keys for `renorm_clipping` argument: {clipping}. "
            f"Supported values: {list(_RENORM_KEYS)}."
        )
    checked = {}
    for key, value in clipping.items():
        if value is not None:
            checked[key] = _check_real(value, f"renorm_clipping[{key!r}]", -math.inf, math.inf)
    rmax, rmin, dmax = (checked.get(key) for key in _RENORM_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            f"renorm_clipping: rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"renorm_clipping: dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return True, dict(clipping), renorm_momentum


@keras.saving.register_keras_serializable(package="fastbn")
class BatchNormalization(keras.layers.Layer):  # type: ignore[misc]  # keras is untyped: Layer is Any
    """Keras's ``BatchNormalization`` layer, computed by fastbn's kernels.

    Same arguments, defaults, weights and behaviour as
    ``keras.layers.BatchNormalization`` (Keras 3); see that layer for the
    full description.  In training (``training=True`` and ``trainable``) the
    output is ``gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the
    batch mean and biased batch variance over every axis but ``axis``, and
    ``moving = moving * momentum + batch * (1 - momentum)``; otherwise the
    moving statistics normalise.

    Parameters
    ----------
    axis : int or list of int, default -1
        The feature axis (or axes: then the weights have the shape of those
        axes, as Keras 2's layer had).
    momentum : float, default 0.99
        In [0, 1]; the weight of the old moving value (Keras's convention:
        PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).
    epsilon : float, default 1e-3
        Positive; added to the variance.
    center, scale : bool, default True
        Whether to add ``beta`` and multiply by ``gamma``.
    beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer
        Keras initializers (default ``"zeros"``, ``"ones"``, ``"zeros"``, ``"ones"``).
    beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint
        Keras regularizers and constraints for the two trainable weights.
    renorm : bool, default False
        Batch renormalization as Keras 3 defines it (extra non-trainable
        weights ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).
    renorm_clipping : dict, optional
        Keys among ``"rmax"``, ``"rmin"``, ``"dmax"`` (Keras's).
    renorm_momentum : float, default 0.99
        Momentum of ``renorm_mean`` and ``renorm_stddev``.
    synchronized : bool, default False
        Must be False: statistics are those of each replica's batch.
    **kwargs
        Base layer arguments (``name``, ``dtype``, ``trainable``...).

    Raises
    ------
    TypeError, ValueError
        For an invalid argument, naming it; for ``synchronized=True``; for a
        Keras backend other than JAX, PyTorch or TensorFlow.  At call time: a
        feature channel with a single value in training (fastbn follows
        PyTorch there, where Keras would return ``beta``), and a mask of the
        wrong shape.

    Notes
    -----
    Differences from Keras's layer: a channel with one value per batch in
    training raises (above); the statistics are computed in float64 on the
    CPU (Keras: in float32), so results agree with Keras's to float32
    rounding rather than bit for bit; float16 and bfloat16 inputs go to fastbn
    as they are, with float32 statistics, where Keras casts them to float32
    first (the same values).  The masked mean is ``sum(x) / count`` where
    Keras divides by ``count + 1e-7``.  With renorm, the correction ``x_hat *
    r * gamma + d * gamma + beta`` is computed elementwise by the backend (in
    float32 for float16/bfloat16 inputs) on fastbn's ``x_hat``.

    Examples
    --------
    >>> import numpy as np, keras
    >>> from fastbn.keras import BatchNormalization
    >>> layer = BatchNormalization(momentum=0.9)
    >>> x = np.arange(12.0, dtype="float32").reshape(4, 3)
    >>> y = layer(x, training=True)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(layer.moving_mean)]
    [0.45, 0.55, 0.65]
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = FRAMEWORKS["keras"].momentum,  # 0.99 (fastbn.conventions)
        epsilon: float = FRAMEWORKS["keras"].eps,  # 1e-3
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        **kwargs: Any,
    ) -> None:
        backend = _backend()
        self.axis = _check_axis(axis)
        self.momentum = _check_real(momentum, "momentum", 0.0, 1.0)
        self.epsilon = _check_real(epsilon, "epsilon", 0.0, math.inf, open_low=True)
        self.center = _check_bool(center, "center")
        self.scale = _check_bool(scale, "scale")
        if _check_bool(synchronized, "synchronized"):
            raise ValueError(
                "synchronized: fastbn.keras.BatchNormalization computes each replica's own batch statistics "
                "(synchronized=False); for statistics synchronised across replicas use "
                "keras.layers.BatchNormalization(synchronized=True) on the TensorFlow backend"
            )
        self.synchronized = False
        self.renorm, self.renorm_clipping, self.renorm_momentum = _check_renorm(
            renorm, renorm_clipping, renorm_momentum
        )
        initializers, regularizers, constraints = keras.initializers, keras.regularizers, keras.constraints
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        super().__init__(**kwargs)
        self.supports_masking = True
        # XLA cannot compile TensorFlow's host callback; JAX's pure_callback jits fine.
        self.supports_jit = backend != "tensorflow"
        # Keras variables, created by build (Keras's attribute names); renorm adds three.
        for name in _WEIGHTS:
            setattr(self, name, None)
        self._axes: list[int] = []

    # -- building ---------------------------------------------------------------------------------

    def _resolve_axes(self, input_shape: Sequence[int | None]) -> list[int]:
        rank = len(input_shape)
        wanted = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        axes = []
        for a in wanted:
            if not -rank <= a < rank:
                raise ValueError(f"axis: {a} is out of bounds for an input of rank {rank} (shape {tuple(input_shape)})")
            axes.append(a % rank)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis: the axes {self.axis} repeat an axis of an input of rank {rank}")
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(f"axis: the feature axis {a} of the input shape {tuple(input_shape)} must be known")
        return sorted(axes)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create the weights (gamma, beta, moving_mean, moving_variance, as Keras), shaped as the feature axes."""
        axes = self._resolve_axes(input_shape)
        if len(input_shape) < 2:
            raise ValueError(f"inputs: expected rank >= 2 (a batch axis and a feature axis), got shape {input_shape}")
        shape = tuple(int(input_shape[a]) for a in axes)  # type: ignore[arg-type]  # known: checked above

        def add(name: str, initializer: Any, regularizer: Any = None, constraint: Any = None) -> Any:
            trainable = name in ("gamma", "beta")
            return self.add_weight(
                shape=shape,
                name=name,
                initializer=initializer,
                regularizer=regularizer,
                constraint=constraint,
                trainable=trainable,
                autocast=False,
            )

        if self.scale:
            self.gamma = add("gamma", self.gamma_initializer, self.gamma_regularizer, self.gamma_constraint)
        if self.center:
            self.beta = add("beta", self.beta_initializer, self.beta_regularizer, self.beta_constraint)
        self.moving_mean = add("moving_mean", self.moving_mean_initializer)
        self.moving_variance = add("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # Keras 3's renorm state: stddevs initialised as the square root of the variance initializer.
            def stddev_initializer(shape: Any, dtype: Any = None) -> Any:
                variance = keras.initializers.get(keras.initializers.serialize(self.moving_variance_initializer))
                return ops.sqrt(variance(shape, dtype=dtype))

            mean_initializer = keras.initializers.get(keras.initializers.serialize(self.moving_mean_initializer))
            self.moving_stddev = add("moving_stddev", stddev_initializer)
            self.renorm_mean = add("renorm_mean", mean_initializer)
            self.renorm_stddev = add("renorm_stddev", stddev_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={a: input_shape[a] for a in axes})
        self._axes = axes

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """The input's shape."""
        self._resolve_axes(input_shape)
        return tuple(input_shape)

    # -- calling ----------------------------------------------------------------------------------

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """Normalise ``inputs``: batch statistics if ``training`` and the layer is trainable, else moving ones.

        Parameters
        ----------
        inputs : tensor
            Of the backend's kind, rank >= 2.
        training : bool or None, default None
            True: batch statistics, moving statistics updated (when the
            layer is trainable); False or None: the moving statistics.
        mask : tensor, optional
            Keras's mask: the shape of ``inputs`` without the feature axis
            (or broadcastable to it), True where a position counts.  In
            training, the statistics are those of the unmasked positions
            only; the output covers every position.  Ignored in inference.
        """
        backend = _backend()
        axes = self._axes
        training = bool(training) and bool(self.trainable)
        x = inputs
        dtype = keras.backend.standardize_dtype(x.dtype)
        if dtype not in (*_REDUCED, "float32", "float64") or (training and self.renorm and dtype in _REDUCED):
            # Keras's rule for other dtypes; renorm's correction is applied elementwise, in float32.
            dtype = keras.backend.result_type(dtype, "float32")
            x = ops.cast(x, dtype)
        stats = "float64" if dtype == "float64" else "float32"
        if mask is not None:
            mask = self._check_mask(mask, x, training)
        gamma = None if self.gamma is None else ops.cast(ops.reshape(self.gamma, (-1,)), stats)
        beta = None if self.beta is None else ops.cast(ops.reshape(self.beta, (-1,)), stats)
        x, channel, restore = _channels_at(x, axes, backend)
        sizes = [d for i, d in enumerate(x.shape) if i != channel]
        count = math.prod(sizes) if all(d is not None for d in sizes) else None  # (math: symbolic sizes too)
        if count == 0:  # an empty batch: an empty output, moving statistics untouched (Keras's become NaN)
            return ops.cast(ops.zeros_like(inputs), self.compute_dtype)
        if training and mask is None and count == 1:
            # fastbn follows PyTorch here (Keras would return beta): raised before anything runs.
            raise ValueError(
                f"inputs: Expected more than 1 value per channel when training, got input size {tuple(inputs.shape)}"
            )
        if training and mask is not None:
            mask = _mask_like(mask, axes, backend)
        if training and self.renorm:
            y = self._renorm_train(backend, x, mask, gamma, beta, channel, stats)
        elif training:
            if mask is None:
                y, mean, var = _TRAIN[backend](x, gamma, beta, self.epsilon, channel, stats)
            else:
                y, mean, var = _masked(backend, x, mask, gamma, beta, self.epsilon, channel)
            self._update_moving(mean, var, stats, None if count is not None else ops.size(x) > 0)
        else:
            moving_mean = ops.cast(ops.reshape(self.moving_mean, (-1,)), stats)
            moving_var = ops.cast(ops.reshape(self.moving_variance, (-1,)), stats)
            y = _INFER[backend](x, gamma, beta, moving_mean, moving_var, self.epsilon, channel)
        return ops.cast(restore(y), self.compute_dtype)

    def _renorm_train(self, backend: str, x: Any, mask: Any, gamma: Any, beta: Any, channel: int, stats: str) -> Any:
        """Keras 3's batch renormalization: ``(x_hat * r + d) * gamma + beta``, ``r`` and ``d`` constants.

        fastbn normalises (``x_hat``, with its gradient); the per-channel
        correction, computed from the same call's statistics and Keras's
        renorm state, is applied elementwise, where autodiff gives Keras's
        gradients for ``gamma`` and ``beta``.
        """
        eps = self.epsilon
        if mask is None:
            x_hat, mean, var = _TRAIN[backend](x, None, None, eps, channel, stats)
        else:
            x_hat, mean, var = _masked(backend, x, mask, None, None, eps, channel)
        mean, var = ops.stop_gradient(mean), ops.stop_gradient(var)
        stddev = ops.sqrt(var + eps)
        renorm_mean = ops.cast(ops.reshape(self.renorm_mean, (-1,)), stats)
        renorm_stddev = ops.cast(ops.reshape(self.renorm_stddev, (-1,)), stats)
        r = stddev / ops.maximum(renorm_stddev, math.sqrt(eps))
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        r, d = ops.stop_gradient(r), ops.stop_gradient(d)
        scale, offset = (r, d) if gamma is None else (r * gamma, d * gamma)
        if beta is not None:
            offset = offset + beta
        shape = [1] * len(x.shape)
        shape[channel] = -1
        y = x_hat * ops.reshape(scale, shape) + ops.reshape(offset, shape)

        # Keras's updates: renorm state with renorm_momentum; moving mean and stddev with momentum,
        # the moving variance derived from the stddev.
        def blend(variable: Any, value: Any, momentum: float) -> Any:
            old = ops.cast(ops.reshape(variable, (-1,)), stats)
            new = old * momentum + value * (1.0 - momentum)
            variable.assign(ops.reshape(new, tuple(variable.shape)))
            return new

        blend(self.renorm_mean, mean, self.renorm_momentum)
        blend(self.renorm_stddev, stddev, self.renorm_momentum)
        blend(self.moving_mean, mean, self.momentum)
        moving_stddev = blend(self.moving_stddev, stddev, self.momentum)
        self.moving_variance.assign(
            ops.reshape(ops.relu(moving_stddev * moving_stddev - eps), tuple(self.moving_variance.shape))
        )
        return y

    def _check_mask(self, mask: Any, x: Any, training: bool) -> Any:
        # Keras checks the rank always and uses the mask in training only: only then must it fit.
        without = tuple(d for i, d in enumerate(x.shape) if i not in self._axes)
        fits = len(mask.shape) == len(without) and (
            not training or all(m is None or d is None or m in (1, d) for m, d in zip(mask.shape, without))
        )
        if not fits:
            raise ValueError(
                f"mask: expected the input's shape without the feature axis, {without} (or one that broadcasts "
                f"to it); got mask.shape={tuple(mask.shape)} for inputs.shape={tuple(x.shape)}"
            )
        return ops.cast(mask, "bool")

    def _update_moving(self, mean: Any, var: Any, stats: str, nonempty: Any = None) -> None:
        """Keras's moving-average update; the old values where ``nonempty`` (batch size known at run time) is False."""
        shape = tuple(self.moving_mean.shape)
        mean = ops.reshape(ops.stop_gradient(mean), shape)
        var = ops.reshape(ops.stop_gradient(var), shape)
        moving_mean = ops.cast(self.moving_mean, stats)
        moving_var = ops.cast(self.moving_variance, stats)
        new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
        new_var = moving_var * self.momentum + var * (1.0 - self.momentum)
        if nonempty is not None:
            new_mean, new_var = ops.where(nonempty, new_mean, moving_mean), ops.where(nonempty, new_var, moving_var)
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_var)

    def get_config(self) -> dict[str, Any]:
        """Keras's configuration keys and values; ``from_config`` rebuilds an equal layer."""
        serialize = keras.saving.serialize_keras_object
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": serialize(self.beta_initializer),
            "gamma_initializer": serialize(self.gamma_initializer),
            "moving_mean_initializer": serialize(self.moving_mean_initializer),
            "moving_variance_initializer": serialize(self.moving_variance_initializer),
            "beta_regularizer": serialize(self.beta_regularizer),
            "gamma_regularizer": serialize(self.gamma_regularizer),
            "beta_constraint": serialize(self.beta_constraint),
            "gamma_constraint": serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
        }
        base: dict[str, Any] = super().get_config()
        return {**base, **config}


# -- layout: one channel axis ---------------------------------------------------------------------


def _channels_at(x: Any, axes: list[int], backend: str) -> tuple[Any, int, Any]:
    """``x`` with its feature axes as one channel axis, that axis, and the function that undoes it.

    One feature axis stays where it is (PyTorch's adapter moves it to 1, a
    strided view).  Several are moved to the end and flattened into one.
    """
    rank = len(x.shape)
    if len(axes) == 1:
        axis = axes[0]
        if backend == "torch" and axis != 1:
            import torch

            return torch.movedim(x, axis, 1), 1, lambda y: torch.movedim(y, 1, axis)
        return x, axis, lambda y: y
    others = [a for a in range(rank) if a not in axes]
    order = others + axes
    moved = ops.transpose(x, order)
    moved_shape = ops.shape(moved)
    kept = [moved_shape[i] for i in range(len(others))]
    flat = ops.reshape(moved, (*kept, -1))
    inverse = list(np.argsort(order))

    def restore(y: Any) -> Any:
        return ops.transpose(ops.reshape(y, moved_shape), inverse)

    if backend == "torch":
        import torch

        return torch.movedim(flat, -1, 1), 1, lambda y: restore(torch.movedim(y, 1, -1))
    return flat, len(others), restore


def _mask_like(mask: Any, axes: list[int], backend: str) -> Any:
    """Keras's mask (the input's shape without the feature axis) laid out as the input is by :func:`_channels_at`.

    The feature axes get size 1 (the mask is the same for every feature), so
    the flattened channel axis has size 1 too: it broadcasts against the input.
    """
    full = mask
    for a in axes:
        full = ops.expand_dims(full, a)
    laid_out, _, _ = _channels_at(full, axes, backend)
    return laid_out
