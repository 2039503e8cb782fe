"""The computation of :class:`fastbn.keras.BatchNormalization`, per Keras backend: fastbn's adapters.

Kept apart from the layer for its length; each function imports its
framework when first called (the layer's backend is the only one needed).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

import fastbn

# -- the computation, per backend -----------------------------------------------------------------


def _biased(unbiased: Any, count: int) -> Any:
    # The adapters return the unbiased variance var * n / (n - 1) (rounded once from float64); Keras keeps
    # the biased one.  One more rounding: within 1.5 ulp of the float64 value.
    return unbiased * ((count - 1) / count)


def _count(x: Any, channel: int) -> int:
    sizes = [d for i, d in enumerate(x.shape) if i != channel]
    return math.prod(sizes)  # (math, not NumPy: symbolic sizes under torch.compile)


def _jax_train(x: Any, gamma: Any, beta: Any, eps: float, channel: int, stats: str) -> tuple[Any, Any, Any]:
    import jax.numpy as jnp

    import fastbn.jax
    from fastbn._jax_stats import biased_variance

    zeros = jnp.zeros((x.shape[channel],), stats)
    # momentum=1 from zeros: the returned "running" statistics are this batch's mean and unbiased variance.
    y, running = fastbn.jax.batch_norm(
        x, gamma, beta, running_mean=zeros, running_var=zeros, training=True, momentum=1.0, eps=eps, axis=channel
    )
    assert running is not None
    mean, unbiased = running
    axes = tuple(i for i in range(x.ndim) if i != channel)
    return y, mean, biased_variance(unbiased, x, axes, _count(x, channel))


def _jax_infer(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, channel: int) -> Any:
    import fastbn.jax

    y, _ = fastbn.jax.batch_norm(
        x, gamma, beta, running_mean=mean, running_var=var, training=False, eps=eps, axis=channel
    )
    return y


def _torch_train(x: Any, gamma: Any, beta: Any, eps: float, channel: int, stats: str) -> tuple[Any, Any, Any]:
    import torch

    import fastbn.torch

    assert channel == 1
    dtype = torch.float64 if stats == "float64" else torch.float32
    mean = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
    unbiased = torch.zeros_like(mean)
    y = fastbn.torch.batch_norm(x, mean, unbiased, gamma, beta, training=True, momentum=1.0, eps=eps)
    eager = unbiased.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager and bool(torch.isinf(unbiased).any()):
        # The unbiased variance overflowed where the biased one, (n - 1) / n of it, may not: computed
        # again.  Checked in eager CPU calls only: on a GPU the check would synchronise every step, and
        # under torch.compile (Keras's jit_compile) it would break the graph at every layer.
        return y, mean, fastbn.torch.moments(x.detach(), 1)[1]
    return y, mean, _biased(unbiased, _count(x, 1))


def _torch_infer(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, channel: int) -> Any:
    import fastbn.torch

    assert channel == 1
    # fastbn's eval never writes the running statistics; clones keep Keras's variables out of its reach anyway.
    return fastbn.torch.batch_norm(x, mean.detach(), var.detach(), gamma, beta, training=False, eps=eps)


def _tf_batch_norm(
    x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, channel: int, training: bool, mask: Any = None
) -> tuple[Any, Any, Any]:
    """``(y, batch mean, biased batch variance)`` on TensorFlow: fastbn's NumPy API in ``tf.numpy_function``.

    ``tf.custom_gradient`` gives fastbn's backward.  In training the
    statistics are those of the batch (of the unmasked positions with a
    mask, which goes to fastbn as ``weights``); otherwise ``mean`` and
    ``var`` normalise and come back as they are.
    """
    import tensorflow as tf  # type: ignore[import-untyped]

    channels = int(x.shape[channel])
    stats = "float64" if x.dtype == tf.float64 else "float32"
    np_stats = np.dtype(stats)
    gamma = tf.ones((channels,), stats) if gamma is None else gamma
    beta = tf.zeros((channels,), stats) if beta is None else beta
    if mean is None:
        mean = var = tf.zeros((channels,), stats)
    masked = mask is not None
    mask = tf.zeros((), tf.bool) if mask is None else mask

    def weights_of(x: Any, mask: Any) -> Any:
        return np.ascontiguousarray(np.broadcast_to(mask, x.shape), dtype=np_stats) if masked else None

    def host_forward(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, mask: Any) -> tuple[Any, ...]:
        w, wsum = weights_of(x, mask), np.zeros(channels)
        if training and w is None:
            # momentum=1 from zeros: the "running" statistics become the batch mean and unbiased variance.
            mean, var = np.zeros(channels, np_stats), np.zeros(channels, np_stats)
        extra = {"weights": w} if w is not None else {"running_mean": mean, "running_var": var, "momentum": 1.0}
        y, saved = fastbn.forward(x, gamma, beta, training=training, eps=eps, axis=channel, **extra)
        if training and w is None:  # an empty batch (found only now, in a graph) leaves them 0
            var = _biased(var.astype(np.float64), x.size // channels).astype(np_stats) if x.size else var
            if np.isinf(var).any():  # the unbiased variance overflowed where the biased one may not
                var = fastbn.moments(x, axis=channel)[1].astype(np_stats)
        elif training:
            # The forward keeps the mean and 1 / sqrt(var + eps): the exact variance takes one more pass.
            mean, var = fastbn.moments(x, axis=channel, weights=w)
            wsum = wsum if saved.weight_sum is None else np.asarray(saved.weight_sum)  # None: an empty batch
        return y, np.asarray(saved.mean), np.asarray(saved.invstd), wsum, mean, var

    def host_backward(dy: Any, x: Any, gamma: Any, mask: Any, mean: Any, invstd: Any, wsum: Any) -> tuple[Any, ...]:
        w = weights_of(x, mask)
        saved = fastbn.Saved(
            mean, invstd, training, x.size // channels, tuple(x.shape), channel, weights=w,
            weight_sum=None if w is None else wsum,
        )  # fmt: skip
        return tuple(fastbn.backward(dy, x, gamma, saved, axis=channel))

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def run(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, mask: Any) -> Any:
        y, saved_mean, invstd, wsum, batch_mean, batch_var = tf.numpy_function(
            host_forward, [x, gamma, beta, mean, var, mask], [x.dtype, stats, stats, "float64", stats, stats], False
        )
        y.set_shape(x.shape)
        for value in (saved_mean, invstd, wsum, batch_mean, batch_var):
            value.set_shape((channels,))

        def grad(dy: Any, *_unused: Any) -> Any:
            dx, dgamma, dbeta = tf.numpy_function(
                host_backward, [dy, x, gamma, mask, saved_mean, invstd, wsum], [x.dtype, stats, stats], False
            )
            dx.set_shape(x.shape)
            dgamma.set_shape((channels,))
            dbeta.set_shape((channels,))
            return dx, dgamma, dbeta, None, None, None

        return (y, tf.stop_gradient(batch_mean), tf.stop_gradient(batch_var)), grad

    y, batch_mean, batch_var = run(x, gamma, beta, mean, var, mask)
    return y, batch_mean, batch_var


def _tf_train(x: Any, gamma: Any, beta: Any, eps: float, channel: int, stats: str) -> tuple[Any, Any, Any]:
    return _tf_batch_norm(x, gamma, beta, None, None, eps, channel, True)


def _tf_infer(x: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float, channel: int) -> Any:
    return _tf_batch_norm(x, gamma, beta, mean, var, eps, channel, False)[0]


_TRAIN = {"jax": _jax_train, "torch": _torch_train, "tensorflow": _tf_train}
_INFER = {"jax": _jax_infer, "torch": _torch_infer, "tensorflow": _tf_infer}


def _masked(backend: str, x: Any, mask: Any, gamma: Any, beta: Any, eps: float, channel: int) -> tuple[Any, Any, Any]:
    """Training with a mask: ``moments(mask=)`` then ``normalize``, both differentiable in the adapters.

    On TensorFlow: :func:`fastbn.forward` and :func:`fastbn.backward` with the
    mask as weights (the statistics and their gradient in fastbn's kernels).
    """
    if backend == "tensorflow":
        if "weights" not in inspect.signature(fastbn.forward).parameters:
            raise ValueError("mask: masked batch statistics need fastbn.forward(weights=), which this fastbn lacks")
        return _tf_batch_norm(x, gamma, beta, None, None, eps, channel, True, mask)
    adapter: Any = None
    if backend == "jax":
        import fastbn.jax as adapter
    elif backend == "torch":
        import fastbn.torch as adapter
    if adapter is None or not (hasattr(adapter, "moments") and hasattr(adapter, "normalize")):
        raise ValueError(
            f"mask: masked batch statistics need differentiable moments(mask=) and normalize in fastbn's "
            f"{backend} adapter, which this fastbn does not have; call the layer without a mask"
        )
    where = {"dim" if backend == "torch" else "axis": channel}  # torch's adapter names the channel axis dim
    mean, var = adapter.moments(x, mask=mask, **where)
    y = adapter.normalize(x, mean, var, gamma, beta, eps=eps, **where)
    return y, mean, var
