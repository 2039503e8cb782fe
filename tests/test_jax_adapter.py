"""fastbn.jax.batch_norm against a pure jax.numpy implementation of the same formulas, in value
and in gradient (with respect to every array argument), eagerly and under jit, grad and vmap.
Skips only when jax is missing."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from fastbn.jax import batch_norm  # noqa: E402

# float64: the formulas are exact, only summation order differs.  float32: a few ulps of
# outputs and of reductions over <= 1e3 elements (data of mean 2, spread 3).  float16: y is
# rounded to half at the end (2^-11 relative), on values up to ~5.  bfloat16: the same, rounded
# to bfloat16 (2^-8 relative; both sides round, so two of bfloat16's ulps of 2^-7).
TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),
    np.dtype(jnp.bfloat16): dict(rtol=2**-6, atol=2**-6),
}


def reference(x, weight, bias, running_mean, running_var, training, momentum, eps, axis):
    """PyTorch's batch norm in plain jax.numpy, two-pass statistics, float32 or wider."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    count = x.size // x.shape[axis]
    stats_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    xs = x.astype(stats_dtype)
    if training or running_mean is None:
        mean = jnp.mean(xs, axis=reduce)
        var = jnp.mean((xs - mean.reshape(shape)) ** 2, axis=reduce)
    else:
        mean, var = running_mean, running_var
    y = (xs - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    if running_mean is None:
        running = None
    elif training:
        running = (
            (1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * var * count / (count - 1),
        )
    else:
        running = (running_mean, running_var)
    return y.astype(x.dtype), running


def make_inputs(shape, dtype, axis, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    x = jnp.asarray(rng.normal(2.0, 3.0, shape).astype(dtype))
    weight = jnp.asarray(rng.uniform(0.5, 2.0, channels).astype(stats_dtype))
    bias = jnp.asarray(rng.normal(0.0, 1.0, channels).astype(stats_dtype))
    running_mean = jnp.asarray(rng.normal(2.0, 1.0, channels).astype(stats_dtype))
    running_var = jnp.asarray(rng.uniform(4.0, 16.0, channels).astype(stats_dtype))
    return x, weight, bias, running_mean, running_var


def assert_close(got, expected, dtype, what):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    np.testing.assert_allclose(
        got.astype(np.float64), expected.astype(np.float64), **TOL[np.dtype(dtype)], err_msg=what
    )


def x64(dtype):
    """float64 needs jax_enable_x64; set it only around the float64 cases."""
    return jax.enable_x64(np.dtype(dtype) == np.float64)


CASES = [
    # shape, axis, training, running, affine
    ((8, 3), 1, True, True, True),
    ((8, 3), 1, False, True, True),
    ((4, 3, 5), 1, True, False, True),
    ((4, 3, 5), 1, False, False, False),
    ((2, 4, 3, 5), -1, True, True, False),
    ((2, 3, 4, 5), 1, False, True, False),
]


# float16 and bfloat16 on two cases only (training on rows, eval on a slab): each new dtype,
# layout and mode compiles kernels, and the cases above already cover the flags.
VALUE_CASES = [(*case, dtype) for dtype in (np.float32, np.float64) for case in CASES] + [
    CASES[i] + (dtype,) for dtype in (np.float16, jnp.bfloat16) for i in (0, 5)
]


@pytest.mark.parametrize("shape, axis, training, running, affine, dtype", VALUE_CASES)
def test_values_match_jax_numpy(shape, axis, training, running, affine, dtype):
    with x64(dtype):
        x, weight, bias, rm, rv = make_inputs(shape, dtype, axis)
        if not affine:
            weight = bias = None
        if not running:
            rm = rv = None
        settings = dict(training=training, momentum=0.3, eps=1e-4, axis=axis)
        jitted = jax.jit(lambda x, w, b, rm, rv: batch_norm(x, w, b, running_mean=rm, running_var=rv, **settings))
        y, new_running = jitted(x, weight, bias, rm, rv)
        eager_y, eager_running = batch_norm(x, weight, bias, running_mean=rm, running_var=rv, **settings)
        expected_y, expected_running = reference(x, weight, bias, rm, rv, **settings)
        assert isinstance(y, jax.Array) and y.dtype == x.dtype
        assert_close(y, expected_y, dtype, "y")
        np.testing.assert_array_equal(np.asarray(eager_y), np.asarray(y))  # jit changes nothing
        if not running:
            assert new_running is None and eager_running is None
            return
        stats_dtype = np.float64 if dtype == np.float64 else np.float32
        for got, eager, expected, what in zip(new_running, eager_running, expected_running, ("mean", "var")):
            assert got.dtype == stats_dtype
            assert_close(got, expected, stats_dtype, f"running {what}")
            np.testing.assert_array_equal(np.asarray(eager), np.asarray(got))
        if not training:  # eval: the given statistics, unchanged
            np.testing.assert_array_equal(np.asarray(new_running[0]), np.asarray(rm))


def loss_of(fn, settings, y_weights, running_weights):
    """A scalar that depends on y and on the new running statistics, for jax.grad."""

    def loss(x, weight, bias, rm, rv):
        y, running = fn(x, weight, bias, rm, rv, **settings)
        total = jnp.sum(y.astype(y_weights.dtype) * y_weights)
        if running is not None and running_weights is not None:
            total = total + jnp.sum(running[0] * running_weights[0]) + jnp.sum(running[1] * running_weights[1])
        return total

    return loss


def ours(x, weight, bias, rm, rv, **settings):
    return batch_norm(x, weight, bias, running_mean=rm, running_var=rv, **settings)


GRAD_CASES = [
    # shape, axis, training, running, through_running
    ((6, 3, 4), 1, True, True, True),
    ((6, 3, 4), 1, True, True, False),
    ((6, 3, 4), 1, False, True, True),
    ((6, 3, 4), 1, False, True, False),
    ((5, 2, 3), -1, True, False, False),
    ((5, 2, 3), -1, False, False, False),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis, training, running, through_running", GRAD_CASES)
def test_gradients_match_jax_numpy(shape, axis, training, running, through_running, dtype):
    with x64(dtype):
        x, weight, bias, rm, rv = make_inputs(shape, dtype, axis, seed=3)
        if not running:
            rm = rv = None
        rng = np.random.default_rng(4)
        stats_dtype = x.dtype if dtype == np.float64 else jnp.float32
        y_weights = jnp.asarray(rng.normal(size=shape), dtype=stats_dtype)
        channels = x.shape[axis]
        running_weights = (
            (
                jnp.asarray(rng.normal(size=channels), dtype=stats_dtype),
                jnp.asarray(rng.normal(size=channels), dtype=stats_dtype),
            )
            if through_running
            else None
        )
        settings = dict(training=training, momentum=0.3, eps=1e-4, axis=axis)
        argnums = (0, 1, 2, 3, 4) if running else (0, 1, 2)
        args = (x, weight, bias, rm, rv)
        got = jax.jit(jax.grad(loss_of(ours, settings, y_weights, running_weights), argnums=argnums))(*args)
        expected = jax.grad(loss_of(reference, settings, y_weights, running_weights), argnums=argnums)(*args)
        names = ("x", "weight", "bias", "running_mean", "running_var")
        for g, e, name in zip(got, expected, names):
            # Gradients are sums over the batch: compare relative to their largest entry.
            scale = float(np.max(np.abs(np.asarray(e, dtype=np.float64)))) or 1.0
            np.testing.assert_allclose(
                np.asarray(g, np.float64),
                np.asarray(e, np.float64),
                rtol=TOL[np.dtype(dtype)]["rtol"],
                atol=TOL[np.dtype(dtype)]["atol"] * max(scale, 1.0),
                err_msg=name,
            )
        # And the value of the loss itself.
        value = jax.jit(loss_of(ours, settings, y_weights, running_weights))(*args)
        expected_value = loss_of(reference, settings, y_weights, running_weights)(*args)
        np.testing.assert_allclose(
            float(value),
            float(expected_value),
            rtol=TOL[np.dtype(dtype)]["rtol"] * 10,
            atol=TOL[np.dtype(dtype)]["atol"] * 10,
        )


def test_float16_input_keeps_float32_statistics():
    x, weight, bias, rm, rv = make_inputs((8, 3), np.float16, 1)
    y, (new_mean, new_var) = batch_norm(x, weight, bias, running_mean=rm, running_var=rv)
    assert y.dtype == jnp.float16 and new_mean.dtype == jnp.float32 and new_var.dtype == jnp.float32
    grads = jax.grad(lambda x, w: jnp.sum(batch_norm(x, w)[0].astype(jnp.float32) ** 3), argnums=(0, 1))(x, weight)
    assert grads[0].dtype == jnp.float16 and grads[1].dtype == jnp.float32


def test_vmap_normalises_each_slice_on_its_own():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 6, 2, 4)).astype(np.float32))

    def normalise(sample):
        return batch_norm(sample, training=True)[0]

    mapped = jax.vmap(normalise)(x)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(np.asarray(mapped[i]), np.asarray(normalise(x[i])), rtol=1e-6, atol=1e-6)


def test_numpy_inputs_are_accepted_and_left_alone():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, (new_mean, _new_var) = batch_norm(x, running_mean=rm, running_var=rv)
    assert isinstance(y, jax.Array) and isinstance(new_mean, jax.Array)
    assert np.all(rm == 0) and np.all(rv == 1)
    np.testing.assert_allclose(np.asarray(new_mean), 0.1 * x.mean(0), rtol=1e-5, atol=1e-7)


def test_errors_are_raised_when_tracing():
    x, weight, _, rm, rv = make_inputs((8, 3), np.float32, 1)
    jitted = jax.jit(lambda x, w: batch_norm(x, w))
    with pytest.raises(ValueError, match=r"^weight: expected shape"):
        jitted(x, weight[:2])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        jax.jit(lambda x: batch_norm(x))(x[:1])
    with pytest.raises(ValueError, match="must be given together"):
        batch_norm(x, running_mean=rm)
    with pytest.raises(TypeError, match=r"^running_var: expected dtype float32"):
        batch_norm(x, running_mean=rm, running_var=rv.astype(jnp.int32))
    with pytest.raises(TypeError, match=r"^x: expected dtype float16, bfloat16, float32 or float64"):
        batch_norm(x.astype(jnp.int32))
    with pytest.raises(TypeError, match=r"^momentum: "):
        jax.jit(lambda x, m: batch_norm(x, momentum=m))(x, 0.1)
    with pytest.raises(TypeError, match=r"^training: "):
        jax.jit(lambda x, t: batch_norm(x, training=t))(x, True)
    # Eval with one value per channel is fine.
    y, _ = batch_norm(x[:1], running_mean=rm, running_var=rv, training=False)
    assert y.shape == (1, 3)
