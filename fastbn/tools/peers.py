"""fastbn's peers in the benchmark: JAX, Flax and TensorFlow, beside NumPy and PyTorch (:mod:`fastbn.tools.cases`).

Each peer is what a user of that library would write for batch norm on the
CPU, timed on the same arrays as fastbn:

* **JAX**: ``jax.jit`` of the straightforward formula (mean and variance over
  the reduced axes, ``(x - mean) * rsqrt(var + eps) * weight + bias``, with
  the running statistics updated), its backward through ``jax.vjp``;
  half-precision input is reduced in float32, as ``jnp.mean(dtype=...)``
  allows;
* **Flax**: ``flax.linen.BatchNorm`` applied under ``jax.jit`` (forward only:
  its backward is JAX's);
* **TensorFlow**: the fused batch norm kernel (``tf.raw_ops.FusedBatchNormV3``
  and ``FusedBatchNormGradV3``) under ``tf.function``, in the row's own layout
  (NHWC, or NCHW for channel-first rows), which on x86 runs oneDNN's kernel
  unless ``TF_ENABLE_ONEDNN_OPTS=0``; ``tf.nn.moments`` for the moments.

A peer that is not installed is reported as absent (:func:`status`), never
silently dropped; an operation a peer has no counterpart for is ``None``.
Each factory returns a zero-argument callable that runs the operation once
and waits for its result (JAX dispatches asynchronously).  Nothing is
imported until a callable is built: TensorFlow alone takes seconds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import jax


#: The peers this module adds, by the name results use, with the name people read.
NAMES = {"jax": "JAX", "flax": "Flax", "tensorflow": "TensorFlow"}

EPS = 1e-5
MOMENTUM = 0.1

# What a peer reads of fastbn.tools.cases's types, typed here: cases imports this module, so this one never
# imports cases (not even for its types).

#: A zero-argument callable that runs one operation once (:data:`fastbn.tools.cases.Timed`).
Timed: TypeAlias = Callable[[], Any]


class Layout(Protocol):
    """What a peer reads of a :class:`fastbn.tools.cases.Shape`."""

    @property
    def dims(self) -> tuple[int, ...]: ...

    @property
    def channel_axis(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def reduce_axes(self) -> tuple[int, ...]: ...

    def per_channel(self) -> tuple[int, ...]: ...


class Data(Protocol):
    """What a peer reads of :class:`fastbn.tools.cases.Inputs`: the shape and the arrays."""

    @property
    def shape(self) -> Layout: ...

    @property
    def x(self) -> npt.NDArray[Any]: ...

    @property
    def dy(self) -> npt.NDArray[Any]: ...

    @property
    def weight(self) -> npt.NDArray[Any]: ...

    @property
    def bias(self) -> npt.NDArray[Any]: ...

    @property
    def running_mean(self) -> npt.NDArray[Any]: ...

    @property
    def running_var(self) -> npt.NDArray[Any]: ...


# ---------------------------------------------------------------- status ---
@functools.cache
def status(name: str) -> tuple[bool, str]:
    """``(installed, text)``: whether a peer's package imports, and its version or why not."""
    package = {"jax": "jax", "flax": "flax", "tensorflow": "tensorflow", "torch": "torch", "numpy": "numpy"}[name]
    if importlib.util.find_spec(package) is None:
        return False, "not installed"
    try:
        version = importlib.metadata.version("tensorflow-cpu" if name == "tensorflow" else package)
    except importlib.metadata.PackageNotFoundError:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
    if name == "tensorflow":
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
        version += ", oneDNN " + ("off (TF_ENABLE_ONEDNN_OPTS=0)" if onednn == "0" else "on (its x86 default)")
    return True, version


# ------------------------------------------------------------------- JAX ---
def _jax() -> None:
    """Keep JAX on the CPU (unless ``JAX_PLATFORMS`` says otherwise); call before importing it."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jax_formula(
    jnp: ModuleType, axes: tuple[int, ...], channel: tuple[int, ...], eps: float
) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """The textbook training forward as a function of (x, weight, bias): y, mean, biased variance."""

    def forward(x: jax.Array, weight: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        acc = jnp.float32 if x.dtype in (jnp.float16, jnp.bfloat16) else x.dtype
        wide = x.astype(acc)
        mean = jnp.mean(wide, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(wide - mean), axis=axes, keepdims=True)
        y = (wide - mean) * jax_rsqrt(jnp, var + eps) * weight.reshape(channel) + bias.reshape(channel)
        return y.astype(x.dtype), mean.reshape(-1), var.reshape(-1)

    return forward


def jax_rsqrt(jnp: ModuleType, value: jax.Array) -> jax.Array:
    """``1 / sqrt(value)``, as JAX spells it."""
    rsqrt: jax.Array = jnp.reciprocal(jnp.sqrt(value))
    return rsqrt


def _jax_callable(operation: str, data: Data) -> Timed:
    _jax()
    import jax
    import jax.numpy as jnp

    axes = data.shape.reduce_axes()
    channel = data.shape.per_channel()
    x, dy = jax.device_put(data.x), jax.device_put(data.dy)
    weight, bias = jax.device_put(data.weight), jax.device_put(data.bias)
    forward = _jax_formula(jnp, axes, channel, EPS)
    count = math.prod(data.shape.dims) // data.shape.channels
    if operation == "forward_train":

        @jax.jit
        def train(
            x: jax.Array, weight: jax.Array, bias: jax.Array, running_mean: jax.Array, running_var: jax.Array
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            y, mean, var = forward(x, weight, bias)
            unbiased = var * (count / max(1, count - 1))
            return (
                y,
                (1 - MOMENTUM) * running_mean + MOMENTUM * mean,
                (1 - MOMENTUM) * running_var + MOMENTUM * unbiased,
            )

        rm, rv = jax.device_put(data.running_mean), jax.device_put(data.running_var)
        return lambda: jax.block_until_ready(train(x, weight, bias, rm, rv))[0]
    if operation == "forward_eval":

        @jax.jit
        def evaluate(x: jax.Array, weight: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
            acc = jnp.float32 if x.dtype in (jnp.float16, jnp.bfloat16) else x.dtype
            scale = jax_rsqrt(jnp, var + EPS) * weight
            y = (x.astype(acc) - mean.reshape(channel)) * scale.reshape(channel) + bias.reshape(channel)
            return y.astype(x.dtype)

        mean, var = jax.device_put(data.running_mean), jax.device_put(data.running_var)
        return lambda: jax.block_until_ready(evaluate(x, weight, bias, mean, var))
    if operation == "backward_train":

        @jax.jit
        def backward(x: jax.Array, weight: jax.Array, bias: jax.Array, dy: jax.Array) -> tuple[jax.Array, ...]:
            _, pullback = jax.vjp(lambda *a: forward(*a)[0], x, weight, bias)
            grads: tuple[jax.Array, ...] = pullback(dy)
            return grads

        return lambda: jax.block_until_ready(backward(x, weight, bias, dy))
    if operation == "moments":

        @jax.jit
        def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            wide = x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x
            return jnp.mean(wide, axis=axes), jnp.var(wide, axis=axes)

        return lambda: jax.block_until_ready(moments(x))
    raise ValueError(operation)


def _flax_callable(operation: str, data: Data) -> Timed | None:
    if operation not in ("forward_train", "forward_eval"):
        return None
    _jax()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    axis = data.shape.channel_axis
    module = nn.BatchNorm(
        use_running_average=operation == "forward_eval",
        axis=axis,
        momentum=1 - MOMENTUM,
        epsilon=EPS,
        dtype=None,
        param_dtype=jnp.float32,
    )
    x = jax.device_put(data.x)
    variables = {
        "params": {"scale": jnp.asarray(data.weight), "bias": jnp.asarray(data.bias)},
        "batch_stats": {"mean": jnp.asarray(data.running_mean), "var": jnp.asarray(data.running_var)},
    }
    if operation == "forward_train":
        apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
        return lambda: jax.block_until_ready(apply(variables, x))[0]
    apply = jax.jit(lambda v, x: module.apply(v, x))
    return lambda: jax.block_until_ready(apply(variables, x))


# ------------------------------------------------------------ TensorFlow ---
def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # type: ignore[import-untyped]  # TensorFlow has no annotations (no py.typed)

    return tf


def tf_layout(shape: Layout) -> tuple[tuple[int, ...], str]:
    """``(4-D shape, data_format)`` TensorFlow's fused kernel sees a row's tensor as, in the same memory order.

    Channels last: ``(outer, 1, 1, C)`` NHWC (a 4-D NHWC tensor as it is);
    otherwise ``(outer, C, inner, 1)`` NCHW (a 4-D NCHW tensor as it is).
    """
    dims, axis = shape.dims, shape.channel_axis
    outer, inner = math.prod(dims[:axis]), math.prod(dims[axis + 1 :])
    if inner == 1:
        return (tuple(dims) if len(dims) == 4 else (outer, 1, 1, shape.channels)), "NHWC"
    return (tuple(dims) if len(dims) == 4 and axis == 1 else (outer, shape.channels, inner, 1)), "NCHW"


def _tf_callable(operation: str, data: Data) -> Timed:
    tf = _tf()
    dims4, data_format = tf_layout(data.shape)
    x = tf.constant(data.x.reshape(dims4))
    dy = tf.constant(data.dy.reshape(dims4))
    weight, bias = tf.constant(data.weight.astype(np.float32)), tf.constant(data.bias.astype(np.float32))
    mean, var = tf.constant(data.running_mean.astype(np.float32)), tf.constant(data.running_var.astype(np.float32))
    fused = functools.partial(tf.raw_ops.FusedBatchNormV3, epsilon=EPS, data_format=data_format)
    if operation == "forward_train":
        call = tf.function(
            lambda: fused(
                x=x,
                scale=weight,
                offset=bias,
                mean=mean,
                variance=var,
                exponential_avg_factor=MOMENTUM,
                is_training=True,
            ),
            autograph=False,
        )
        return lambda: call()[0].numpy()
    if operation == "forward_eval":
        call = tf.function(
            lambda: fused(x=x, scale=weight, offset=bias, mean=mean, variance=var, is_training=False)[0],
            autograph=False,
        )
        return lambda: call().numpy()
    if operation == "backward_train":
        empty = tf.constant([], tf.float32)
        saved = fused(x=x, scale=weight, offset=bias, mean=empty, variance=empty, is_training=True)
        call = tf.function(
            lambda: tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=weight,
                reserve_space_1=saved[3],
                reserve_space_2=saved[4],
                reserve_space_3=saved[5],
                epsilon=EPS,
                data_format=data_format,
                is_training=True,
            )[:3],
            autograph=False,
        )
        return lambda: call()[0].numpy()
    if operation == "moments":
        axes = [0, 1, 2] if data_format == "NHWC" else [0, 2, 3]
        wide = tf.cast(x, tf.float32) if data.x.dtype == np.float16 else x
        call = tf.function(lambda: tf.nn.moments(wide, axes=axes), autograph=False)
        return lambda: [t.numpy() for t in call()]
    raise ValueError(operation)


#: The factories, by peer name, as :data:`fastbn.tools.cases.LIBRARIES` adds them.
FACTORIES: dict[str, Callable[[str, Data], Timed | None]] = {
    "jax": _jax_callable,
    "flax": _flax_callable,
    "tensorflow": _tf_callable,
}


# ------------------------------------------------------ the size sweep ---
def sweep_callables(name: str, data: Data, forward: Timed | None) -> dict[str, Timed | None]:
    """``{"forward": f, "forward+backward": g}`` for the size sweep: a training forward, and one with its backward.

    ``name`` is ``"fastbn"`` (``fastbn.forward``, and ``fastbn.torch``'s
    autograd function for forward plus backward), ``"torch"``, ``"jax"``,
    ``"flax"`` (forward only), ``"tensorflow"`` or ``"numpy"`` (forward only);
    ``forward`` is its training forward on ``data``
    (:data:`fastbn.tools.cases.LIBRARIES`).  The backward of each runs its
    library's own autograd on ``dy``.
    """
    found: dict[str, Timed | None] = {"forward": forward}
    if name in ("fastbn", "torch"):
        import torch
        import torch.nn.functional as F

        axis = data.shape.channel_axis
        x = torch.movedim(torch.from_numpy(data.x), axis, 1).detach().requires_grad_(True)
        dy = torch.movedim(torch.from_numpy(data.dy), axis, 1)
        weight = torch.from_numpy(data.weight).clone().requires_grad_(True)
        bias = torch.from_numpy(data.bias).clone().requires_grad_(True)
        batch_norm: Callable[..., torch.Tensor]
        if name == "fastbn":
            import fastbn.torch as fbt

            batch_norm = fbt.batch_norm
        else:
            batch_norm = F.batch_norm

        def forward_backward() -> tuple[torch.Tensor, ...]:
            y = batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
            return torch.autograd.grad(y, (x, weight, bias), dy)

        found["forward+backward"] = forward_backward
    elif name == "jax":
        _jax()
        import jax
        import jax.numpy as jnp

        formula = _jax_formula(jnp, data.shape.reduce_axes(), data.shape.per_channel(), EPS)
        x, dy = jax.device_put(data.x), jax.device_put(data.dy)
        weight, bias = jax.device_put(data.weight), jax.device_put(data.bias)

        @jax.jit
        def both(
            x: jax.Array, weight: jax.Array, bias: jax.Array, dy: jax.Array
        ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            y, pullback = jax.vjp(lambda *a: formula(*a)[0], x, weight, bias)
            return y, pullback(dy)

        found["forward+backward"] = lambda: jax.block_until_ready(both(x, weight, bias, dy))
    elif name == "tensorflow":
        tf = _tf()
        dims4, data_format = tf_layout(data.shape)
        x, dy = tf.constant(data.x.reshape(dims4)), tf.constant(data.dy.reshape(dims4))
        weight, bias = tf.Variable(data.weight.astype(np.float32)), tf.Variable(data.bias.astype(np.float32))

        def step() -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                    x, weight, bias, epsilon=EPS, data_format=data_format, is_training=True
                )
            return tape.gradient(y, [x, weight, bias], output_gradients=dy)

        call = tf.function(step, autograph=False)
        found["forward+backward"] = lambda: [t.numpy() for t in call()]
    return found


def check(value: npt.ArrayLike, expected: npt.ArrayLike, dims: Sequence[int]) -> float:
    """Max error of a peer's main output against the float64 oracle's, relative to the oracle's largest value."""
    got = np.asarray(value, dtype=np.float64).reshape(dims)
    oracle = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(got - oracle))) / max(float(np.max(np.abs(oracle))), 1e-30)


def autograd_floor(data: Data) -> Callable[[], tuple[Any, ...]]:
    """A forward plus backward through a Python ``torch.autograd.Function`` that computes nothing.

    Its forward returns a view of the input, its backward the incoming
    gradient and two precomputed per-channel gradients, with the size
    sweep's tensors and ``torch.autograd.grad`` call.  What it costs is the
    least any autograd extension written in Python (``fastbn.torch`` is one)
    pays per call, against torch's batch norm, whose autograd node is C++.
    """
    import torch

    axis = data.shape.channel_axis
    x = torch.movedim(torch.from_numpy(data.x), axis, 1).detach().requires_grad_(True)
    dy = torch.movedim(torch.from_numpy(data.dy), axis, 1)
    weight = torch.from_numpy(data.weight).clone().requires_grad_(True)
    bias = torch.from_numpy(data.bias).clone().requires_grad_(True)
    per_channel = torch.zeros_like(weight)

    class NoOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, weight)
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ctx.saved_tensors  # noqa: B018  # unpacked, as every real backward does
            return grad, per_channel, per_channel

    def forward_backward() -> tuple[torch.Tensor, ...]:
        y = NoOp.apply(x, weight, bias)  # type: ignore[no-untyped-call]  # torch's Function.apply is unannotated
        return torch.autograd.grad(y, (x, weight, bias), dy)

    return forward_backward
