"""fastbn.jax against pure jax.numpy implementations of the same formulas: batch_norm in value and
gradient (with respect to every array argument), eagerly and under jit, grad and vmap, and in
second derivatives (Hessian-vector products, reverse over reverse, against forward over reverse
and jax.hessian of the reference, float64); moments (channel axis or reduction axes, keepdims,
weights, masks) and normalize (broadcastable parameters) in value, gradient and Hessian-vector
products; merge_moments on uneven parts.  Skips only when jax is missing."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import fastbn  # noqa: E402
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


# --- second derivatives of batch_norm ------------------------------------------------------------

from fastbn.jax import merge_moments, moments, normalize  # noqa: E402


def hvp_reverse(loss, args, vectors):
    """Hessian-vector product by reverse over reverse (custom_vjp has no forward mode), jitted."""
    argnums = tuple(range(len(args)))
    grad = jax.grad(loss, argnums=argnums)

    def directional(*a):
        return sum(jnp.vdot(g, v) for g, v in zip(grad(*a), vectors))

    return jax.jit(jax.grad(directional, argnums=argnums))(*args)


def hvp_forward(loss, args, vectors):
    """The same product by forward over reverse, for the plain jax.numpy references (jitted:
    one compilation is cheaper than dispatching each of their many small operations)."""
    argnums = tuple(range(len(args)))
    return jax.jit(lambda *a: jax.jvp(jax.grad(loss, argnums=argnums), a, tuple(vectors))[1])(*args)


def assert_hvp_close(got, expected, names):
    for g, e, name in zip(got, expected, names):
        g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
        scale = max(float(np.max(np.abs(e))), 1.0)
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-10 * scale, err_msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_is_twice_differentiable(training):
    # The loss is non-linear in y and in the running statistics, so every block of the Hessian
    # (x with x, x with weight, the running statistics with x ...) is exercised.
    with jax.enable_x64(True):
        x, weight, bias, rm, rv = make_inputs((6, 3, 4), np.float64, 1, seed=7)
        rng = np.random.default_rng(8)
        y_weights = jnp.asarray(rng.normal(size=x.shape))
        r_weights = jnp.asarray(rng.normal(size=(2, 3)))

        def loss_of(fn, y_weights=y_weights):
            def loss(x, weight, bias, rm, rv):
                y, running = fn(x, weight, bias, rm, rv)
                return (
                    jnp.sum(jnp.sin(y) * y_weights)
                    + jnp.sum(running[0] ** 2 * r_weights[0])
                    + jnp.sum(running[1] ** 2 * r_weights[1])
                )

            return loss

        settings = dict(training=training, momentum=0.3, eps=1e-4, axis=1)
        args = (x, weight, bias, rm, rv)
        vectors = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        got = jax.jit(lambda *a: hvp_reverse(loss_of(ours_with(settings)), a, vectors))(*args)
        expected = hvp_forward(loss_of(lambda *a: reference(*a, **settings)), args, vectors)
        assert_hvp_close(got, expected, ("x", "weight", "bias", "running_mean", "running_var"))
        # And the full Hessian in x against jax.hessian of the reference, on a small case.
        small, small_weights = x[:3, :, :2], y_weights[:3, :, :2]
        f = lambda x: loss_of(ours_with(settings), small_weights)(x, weight, bias, rm, rv)  # noqa: E731
        g = lambda x: loss_of(lambda *a: reference(*a, **settings), small_weights)(x, weight, bias, rm, rv)  # noqa: E731
        np.testing.assert_allclose(
            np.asarray(jax.jit(jax.jacrev(jax.jacrev(f)))(small)),
            np.asarray(jax.jit(jax.hessian(g))(small)),
            rtol=1e-9,
            atol=1e-10,
        )


def ours_with(settings):
    return lambda x, weight, bias, rm, rv: ours(x, weight, bias, rm, rv, **settings)


def test_batch_norm_hessian_without_affine_or_running_statistics_channels_last():
    with jax.enable_x64(True):
        x, _, _, _, _ = make_inputs((5, 2, 3), np.float64, -1, seed=9)
        v = jnp.asarray(np.random.default_rng(10).normal(size=x.shape))

        def loss_of(fn):
            return lambda x: jnp.sum(fn(x) ** 3)

        ours_loss = loss_of(lambda x: batch_norm(x, axis=-1)[0])
        ref_loss = loss_of(lambda x: reference(x, None, None, None, None, True, 0.1, 1e-5, -1)[0])
        got = hvp_reverse(ours_loss, (x,), (v,))
        expected = hvp_forward(ref_loss, (x,), (v,))
        assert_hvp_close(got, expected, ("x",))


# --- moments --------------------------------------------------------------------------------------


def reference_moments(x, reduce, keepdims, weights):
    stats = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    xs = x.astype(stats)
    w = jnp.ones_like(xs) if weights is None else jnp.broadcast_to(weights, x.shape).astype(stats)
    total = jnp.sum(w, axis=reduce, keepdims=True)
    mean = jnp.sum(w * xs, axis=reduce, keepdims=True) / total
    var = jnp.sum(w * (xs - mean) ** 2, axis=reduce, keepdims=True) / total
    if not keepdims:
        mean, var = jnp.squeeze(mean, reduce), jnp.squeeze(var, reduce)
    return mean, var


MOMENT_CASES = [
    # shape, call arguments, reduction axes of the reference, weights shape (None: unweighted)
    ((6, 3), dict(), (0,), None),
    ((2, 3, 4, 5), dict(axes=(0, 2), keepdims=True), (0, 2), None),
    ((4, 3, 5), dict(axes=0), (0,), None),  # two kept axes (H, W): one (3 * 5)-channel axis
    ((3, 4, 5), dict(axes=1), (1,), None),  # kept axes 0 and 2: transposed first
    ((7,), dict(axes=[0]), (0,), None),
    ((6, 3, 4), dict(axis=-1), (0, 1), (6, 3, 1)),  # weights broadcast over the channels
    ((6, 3, 4), dict(axes=(0, 2), keepdims=True), (0, 2), (6, 3, 4)),
]


@pytest.mark.parametrize("shape, kwargs, reduce, weights_shape", MOMENT_CASES)
def test_moments_values_and_gradients_match_jax_numpy(shape, kwargs, reduce, weights_shape):
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        x = jnp.asarray(rng.normal(2.0, 3.0, shape))
        weights = None if weights_shape is None else jnp.asarray(rng.uniform(0.0, 2.0, weights_shape))
        keepdims = kwargs.get("keepdims", False)
        mean, var = jax.jit(lambda x, w: moments(x, weights=w, **kwargs))(x, weights)
        ref_mean, ref_var = reference_moments(x, reduce, keepdims, weights)
        assert mean.shape == ref_mean.shape and mean.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(mean), np.asarray(ref_mean), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(var), np.asarray(ref_var), rtol=1e-12, atol=1e-12)

        c_mean = jnp.asarray(rng.normal(size=mean.shape))
        c_var = jnp.asarray(rng.normal(size=mean.shape))

        def loss_of(fn):
            def loss(x, w):
                m, v = fn(x, w)
                return jnp.sum(jnp.sin(m) * c_mean) + jnp.sum(v**2 * c_var)

            return loss

        ours_loss = loss_of(lambda x, w: moments(x, weights=w, **kwargs))
        ref_loss = loss_of(lambda x, w: reference_moments(x, reduce, keepdims, w))
        if weights is None:
            got = jax.jit(jax.grad(ours_loss))(x, None)
            want = jax.jit(jax.grad(ref_loss))(x, None)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)
            v = jnp.asarray(rng.normal(size=shape))
            got = hvp_reverse(lambda x: ours_loss(x, None), (x,), (v,))
            expected = hvp_forward(lambda x: ref_loss(x, None), (x,), (v,))
            assert_hvp_close(got, expected, ("x",))
        else:
            got = jax.jit(jax.grad(ours_loss, argnums=(0, 1)))(x, weights)
            expected = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(x, weights)
            for g, e, name in zip(got, expected, ("x", "weights")):
                assert g.shape == e.shape, name
                np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-10, atol=1e-12, err_msg=name)
            vectors = (jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=weights_shape)))
            got = hvp_reverse(ours_loss, (x, weights), vectors)
            expected = hvp_forward(ref_loss, (x, weights), vectors)
            assert_hvp_close(got, expected, ("x", "weights"))


def test_moments_mask_float32_vmap_and_edge_cases():
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(5, 4, 3)).astype(np.float32))
    mask = jnp.asarray(rng.uniform(size=(5, 4)) < 0.6).at[0, 0].set(True)
    # Keras's mask: x's shape without the channel axis.
    mean, var = moments(x, axis=-1, mask=mask)
    ref_mean, ref_var = reference_moments(x, (0, 1), False, mask[..., None].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(mean), np.asarray(ref_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), np.asarray(ref_var), rtol=1e-5, atol=1e-6)
    assert mean.dtype == jnp.float32
    # float16 input: float32 statistics.
    m16, _ = moments(x.astype(jnp.float16), axis=-1)
    assert m16.dtype == jnp.float32
    # vmap: each slice on its own.
    mapped = jax.vmap(lambda s: moments(s, axes=0)[1])(x)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(np.asarray(mapped[i]), np.var(np.asarray(x[i], np.float64), axis=0), rtol=1e-5)
    # Zero total weight: 0 and 0 (TensorFlow's divide_no_nan); an empty batch: NaN.
    m0, v0 = moments(x, axes=(0, 1), weights=jnp.zeros((5, 4, 3)).at[:, :, 1].set(1.0))
    assert float(m0[0]) == 0.0 and float(v0[0]) == 0.0 and float(v0[1]) > 0
    me, ve = moments(jnp.zeros((0, 3), jnp.float32), axes=0)
    assert me.shape == (3,) and np.isnan(np.asarray(me)).all() and np.isnan(np.asarray(ve)).all()
    # Traced weights cannot be checked when tracing: a negative one gives NaN, not a runtime error.
    mn, vn = jax.jit(lambda w: moments(x, axes=(0, 1), weights=w))(jnp.ones(3).at[1].set(-1.0))
    assert np.isnan(np.asarray(mn)).all() and np.isnan(np.asarray(vn)).all()


def test_moments_errors_at_trace_time():
    x = jnp.zeros((4, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"^axis, axes: "):
        moments(x, 1, axes=0)
    with pytest.raises(ValueError, match=r"^axes: 2 is out of range"):
        jax.jit(lambda x: moments(x, axes=[0, 2]))(x)
    with pytest.raises(ValueError, match=r"^axes: repeated"):
        moments(x, axes=[0, -2])
    with pytest.raises(TypeError, match=r"^axes: "):
        moments(x, axes=0.5)
    with pytest.raises(ValueError, match=r"^weights: shape \(5,\) does not broadcast"):
        moments(x, axes=0, weights=jnp.ones(5))
    with pytest.raises(TypeError, match=r"^mask: expected a bool array"):
        moments(x, axes=0, mask=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"^weights, mask: "):
        moments(x, axes=0, weights=jnp.ones(3), mask=jnp.ones(3, bool))
    with pytest.raises(TypeError, match=r"^x: expected dtype"):
        moments(x.astype(jnp.int32), axes=0)
    with pytest.raises(TypeError, match=r"^keepdims: "):
        moments(x, axes=0, keepdims=1)


# --- normalize ------------------------------------------------------------------------------------


def reference_normalize(x, mean, var, weight, bias, eps, axis):
    stats = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    shape = [1] * x.ndim
    shape[axis] = -1

    def per_channel(p):
        return jnp.broadcast_to(p.reshape(-1), (x.shape[axis],)).astype(stats).reshape(shape)

    y = (x.astype(stats) - per_channel(mean)) / jnp.sqrt(per_channel(var) + eps)
    if weight is not None:
        y = y * per_channel(weight)
    if bias is not None:
        y = y + per_channel(bias)
    return y.astype(x.dtype)


NORMALIZE_CASES = [
    # shape, parameter shape, axis given to normalize (None: inferred), the channel axis, affine
    ((6, 3), (3,), None, 1, True),
    ((2, 4, 3, 3), (1, 1, 1, 3), None, 3, True),  # NHWC, broadcastable parameters, inferred axis
    ((2, 3, 4, 5), (3, 1, 1), None, 1, False),  # NCHW with (C, 1, 1) parameters
    ((5, 2, 3), (1, 1, 3), -1, 2, True),
]


@pytest.mark.parametrize("shape, param_shape, axis, channel_axis, affine", NORMALIZE_CASES)
def test_normalize_values_and_gradients_match_jax_numpy(shape, param_shape, axis, channel_axis, affine):
    with jax.enable_x64(True):
        rng = np.random.default_rng(13)
        x = jnp.asarray(rng.normal(2.0, 3.0, shape))
        mean = jnp.asarray(rng.normal(2.0, 1.0, param_shape))
        var = jnp.asarray(rng.uniform(4.0, 9.0, param_shape))
        weight = jnp.asarray(rng.uniform(0.5, 2.0, param_shape)) if affine else None
        bias = jnp.asarray(rng.normal(size=param_shape)) if affine else None
        y = jax.jit(lambda *a: normalize(*a, eps=1e-3, axis=axis))(x, mean, var, weight, bias)
        expected = reference_normalize(x, mean, var, weight, bias, 1e-3, channel_axis)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-12, atol=1e-12)

        y_weights = jnp.asarray(rng.normal(size=shape))
        args = (x, mean, var) + ((weight, bias) if affine else ())

        def loss_of(fn):
            return lambda *a: jnp.sum(jnp.sin(fn(*a)) * y_weights)

        ours_loss = loss_of(lambda *a: normalize(*a, eps=1e-3, axis=axis))
        ref_loss = loss_of(lambda *a: reference_normalize(*(*a, None, None)[:5], 1e-3, channel_axis))
        argnums = tuple(range(len(args)))
        got = jax.jit(jax.grad(ours_loss, argnums=argnums))(*args)
        want = jax.grad(ref_loss, argnums=argnums)(*args)
        names = ("x", "mean", "var", "weight", "bias")
        for g, e, name in zip(got, want, names):
            assert g.shape == e.shape, name  # broadcast parameters: gradients of their own shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-10, atol=1e-10, err_msg=name)
        vectors = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        assert_hvp_close(hvp_reverse(ours_loss, args, vectors), hvp_forward(ref_loss, args, vectors), names)


def test_normalize_float16_parameters_of_any_float_dtype_and_errors():
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(size=(8, 3)).astype(np.float16))
    mean = jnp.asarray(rng.normal(size=3).astype(np.float16))
    var = jnp.asarray(rng.uniform(1, 2, 3).astype(np.float16))
    y = normalize(x, mean, var)
    assert y.dtype == jnp.float16
    expected = reference_normalize(x, mean, var, None, None, 1e-5, 1)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected, np.float32), rtol=2e-3, atol=2e-3)
    gm = jax.grad(lambda m: jnp.sum(normalize(x, m, var).astype(jnp.float32)))(mean)
    assert gm.dtype == jnp.float16 and gm.shape == (3,)
    with pytest.raises(ValueError, match=r"^mean: expected shape \(3,\)"):
        normalize(x, mean[:2], var)
    with pytest.raises(ValueError, match=r"^var: expected shape \(3,\) or a shape broadcastable"):
        normalize(x, mean, jnp.ones((8, 3)), axis=1)
    with pytest.raises(ValueError, match=r"^mean, var: vary along axes"):
        normalize(jnp.zeros((2, 3, 4)), jnp.ones((3, 1)), jnp.ones((1, 4)))
    with pytest.raises(TypeError, match=r"^weight: expected a float array"):
        normalize(x, mean, var, jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match=r"^eps: "):
        jax.jit(lambda x: normalize(x, mean, var, eps=0.0))(x)


# --- merging moments -----------------------------------------------------------------------------


def test_merge_moments_is_exact_for_uneven_parts_and_differentiable():
    with jax.enable_x64(True):
        rng = np.random.default_rng(15)
        sizes = (1, 0, 12)
        parts = [jnp.asarray(rng.normal(3.0, 2.0, (n, 4))) for n in sizes]
        whole = jnp.concatenate(parts)

        def merged(parts):
            stats = [moments(p, axes=0) if p.shape[0] else (jnp.full(4, jnp.nan), jnp.full(4, jnp.nan)) for p in parts]
            counts = jnp.asarray([p.shape[0] for p in parts])
            return merge_moments(counts, jnp.stack([s[0] for s in stats]), jnp.stack([s[1] for s in stats]))

        count, mean, var = merged(parts)
        assert float(count[0]) == sum(sizes)
        np.testing.assert_allclose(np.asarray(mean), np.mean(np.asarray(whole), 0), rtol=1e-13)
        np.testing.assert_allclose(np.asarray(var), np.var(np.asarray(whole), 0), rtol=1e-13)
        # An equal-weight mean of the parts' means (what pmean does) is not the whole's mean here.
        naive = np.mean([np.asarray(p).mean(0) for p in parts if p.shape[0]], axis=0)
        assert np.max(np.abs(naive - np.asarray(mean))) > 1e-3
        c = jnp.asarray(rng.normal(size=4))
        got = jax.jit(jax.grad(lambda ps: jnp.sum(merged(ps)[2] * c) + jnp.sum(merged(ps)[1] ** 2)))(parts)
        want = jax.grad(lambda w: jnp.sum(jnp.var(w, 0) * c) + jnp.sum(jnp.mean(w, 0) ** 2))(whole)
        offsets = np.cumsum((0, *sizes))
        for g, lo, hi in zip(got, offsets[:-1], offsets[1:]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(want[lo:hi]), rtol=1e-11, atol=1e-12)


# --- static options and values known when called ---------------------------------------------------


def test_static_options_take_numpy_and_jax_scalars_and_refuse_traced_ones():
    """eps and momentum are fixed when the host call is traced: concrete NumPy/JAX scalars are their values; a
    traced one is a TypeError naming the argument before anything runs.  A subnormal eps is taken where
    fastbn.forward takes it."""
    x, weight, _, rm, rv = make_inputs((8, 3), np.float32, 1, seed=2)
    eps = float(np.float32(1e-3))
    y_ref, run_ref = batch_norm(x, weight, running_mean=rm, running_var=rv, eps=eps, momentum=0.25)
    for scalar in (np.float32, jnp.float32):
        y, run = batch_norm(x, weight, running_mean=rm, running_var=rv, eps=scalar(1e-3), momentum=scalar(0.25))
        assert np.array_equal(y, y_ref) and all(np.array_equal(a, b) for a, b in zip(run, run_ref))
    np.testing.assert_array_equal(normalize(x, rm, rv, eps=jnp.float32(1e-3)), normalize(x, rm, rv, eps=eps))
    with pytest.raises(TypeError, match=r"^eps: expected a Python float, got a traced value"):
        jax.jit(lambda x, e: batch_norm(x, eps=e))(x, 1e-3)
    with pytest.raises(TypeError, match=r"^eps: expected a Python float, got a traced value"):
        jax.jit(lambda x, e: normalize(x, rm, rv, eps=e))(x, 1e-3)
    # a subnormal eps: taken where fastbn.forward takes it (eval, here), with fastbn.forward's results
    rv0 = np.asarray(rv).copy()
    rv0[0] = 0.0
    for eps in (1e-310, 5e-324):
        want = fastbn.forward(np.asarray(x), running_mean=np.asarray(rm), running_var=rv0, training=False, eps=eps)[0]
        for run in (batch_norm, jax.jit(batch_norm, static_argnames=("training", "eps"))):
            got = run(x, running_mean=rm, running_var=jnp.asarray(rv0), training=False, eps=eps)[0]
            np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match=r"^eps: "):  # batch statistics in float32: 1 / sqrt(eps) beyond its range
        batch_norm(x, eps=1e-310)


def test_negative_variances_are_a_value_error_when_concrete_and_inside_xlas_error_when_traced():
    x, _, _, rm, _ = make_inputs((8, 3), np.float32, 1, seed=3)
    bad = jnp.asarray([1.0, -1.0, 1.0], jnp.float32)
    with pytest.raises(ValueError, match=r"^running_var: expected non-negative variances, got -1.0 for channel 1"):
        batch_norm(x, running_mean=rm, running_var=bad, training=False)
    with pytest.raises(ValueError, match=r"^var: expected non-negative variances, got -1.0 for channel 1"):
        normalize(x, rm, bad)
    # Training only writes running_var (no read): a negative one is not this call's concern, as in torch.
    batch_norm(x, running_mean=rm, running_var=bad, training=True)
    # Under jit the values exist only in the callback: the same message, inside XLA's runtime error.
    with pytest.raises(Exception, match=r"running_var: expected non-negative variances") as caught:
        jax.block_until_ready(jax.jit(lambda v: batch_norm(x, running_mean=rm, running_var=v, training=False))(bad))
    assert type(caught.value).__name__ == "JaxRuntimeError"


def test_an_eps_whose_inverse_root_float32_cannot_hold_is_refused_when_traced():
    x = jnp.ones((4, 3), jnp.float32)
    for call in (
        lambda: jax.jit(lambda x: batch_norm(x, eps=1e-80))(x),
        lambda: jax.jit(lambda x: normalize(x, jnp.zeros(3), jnp.zeros(3), eps=1e-80))(x),
    ):
        with pytest.raises(ValueError, match=r"^eps: expected at least 8.7e-78 with float32 statistics"):
            call()


def test_moments_mask_and_eval_eps_are_taken_as_the_numpy_api_takes_them():
    """A (N,) mask with axes=[0] on (N, C) input (one kept axis: its channel axis), and eps=0 in eval with
    running statistics, as fastbn.moments and fastbn.forward (and torch) take them."""
    x = np.random.default_rng(9).standard_normal((6, 3)).astype(np.float32)
    mask = np.array([True] * 4 + [False] * 2)
    for got, want in zip(
        moments(jnp.asarray(x), axes=[0], mask=jnp.asarray(mask)), fastbn.moments(x, axes=[0], mask=mask)
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    rm, rv = jnp.zeros(3), jnp.full(3, 4.0)
    y, _ = batch_norm(jnp.asarray(x), running_mean=rm, running_var=rv, training=False, eps=0.0)
    np.testing.assert_allclose(np.asarray(y), x / 2, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^eps: expected a positive float where batch statistics are used"):
        batch_norm(jnp.asarray(x), eps=0.0)


def test_callbacks_keep_subnormals_that_xla_flushes():
    """XLA calls back with subnormals flushed to zero: a float32 channel of +-3e38 has an invstd of 4e-39, a
    subnormal, which became 0 (outputs 0 and NaN where they are -2 and 0.5).  fastbn's callbacks run in the
    default environment, and give fastbn.forward's outputs, eagerly and under jax.jit, and the gradients too."""
    x = np.full((5, 3), 3e38, np.float32)
    x[0] = -3e38
    want, saved = fastbn.forward(x)
    assert 0 < saved.invstd[0] < np.finfo(np.float32).tiny  # subnormal
    for run in (batch_norm, jax.jit(batch_norm)):
        y, _ = run(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), want)
    mean, var = moments(jnp.asarray(x))
    np.testing.assert_array_equal(
        np.asarray(normalize(jnp.asarray(x), mean, var)), fastbn.normalize(x, *fastbn.moments(x))
    )
    dy = np.ones_like(x)
    grad = jax.grad(lambda a: (batch_norm(a)[0] * jnp.asarray(dy)).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), fastbn.backward(dy, x, None, saved)[0])
    # the premise (XLA's callbacks flush), and the caller's environment restored after fastbn's part of one
    from fastbn._fpenv import ieee_subnormals

    def callback(inside):
        inner = ieee_subnormals(lambda: np.float32(1e-38) * np.float32(0.01))()
        return np.array([inner, np.float32(1e-38) * np.float32(0.01)], np.float32)

    inner, after = jax.pure_callback(callback, jax.ShapeDtypeStruct((2,), jnp.float32), jnp.float32(0))
    assert float(inner) == np.float32(1e-40) and float(after) == 0.0
