"""TensorFlow's own batch-norm and moments tests, ported to fastbn and run against real TensorFlow.

Ports of tensorflow/python/ops/nn_batchnorm_test.py (tf.nn.batch_normalization, tf.nn.moments,
tf.nn.weighted_moments and their gradients) and tensorflow/python/ops/nn_fused_batchnorm_test.py
(tf.compat.v1.nn.fused_batch_norm: training, inference, NHWC/NCHW/NDHWC/NCDHW, float16, bfloat16,
float32, exponential_avg_factor, gradients, shape errors), rewritten: the cases (shapes, dtypes,
flags) are upstream's, each test names the upstream test it ports, and every expected value comes
from the real TensorFlow op on the same input, never from a constant.

How TensorFlow's conventions map onto fastbn's is in tests/tf_cases.py, in one place
(``CONVENTIONS`` and ``fused_batch_norm``), and so are the tolerances (``TF_TOLERANCES``).  Where a
result depends on a convention in which fastbn deliberately follows PyTorch (one value per channel
in training raises; an empty batch leaves running statistics alone; eps must be positive with batch
statistics), the test checks fastbn's documented behaviour instead, and TensorFlow's, so that the
mapping stays true.

Gradients: fastbn.backward (training and eval) against TensorFlow's analytic gradients
(tf.GradientTape) for a random output gradient, instead of upstream's numeric Jacobians, which is
stricter; and the gradients of tf.nn.batch_normalization w.r.t. all five inputs, and of
tf.nn.moments / tf.nn.weighted_moments w.r.t. x and the weights, through fastbn.jax.normalize and
fastbn.jax.moments (jax.vjp).

Not ported: SufficientStatisticsTest and NormalizeMomentsTest (tf.nn.sufficient_statistics and
tf.nn.normalize_moments have no fastbn counterpart), and _test_grad_grad (second derivatives of the
fused op; fastbn.backward has none).

One TensorFlow import per module (5-30 s); the cases are kept small so that the module stays well
under a minute.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

# One xdist worker imports TensorFlow for this module and tests/test_conventions.py (README: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("tensorflow")

from tf_cases import (  # noqa: E402
    BFLOAT16,
    CONVENTIONS,
    assert_tf_close,
    data_format_axis,
    fused_batch_norm,
    markdown_table,
)

import fastbn  # noqa: E402

HALF_AND_SINGLE = (np.dtype(np.float16), np.dtype(np.float32), BFLOAT16)  # upstream's _runtests dtypes
EPSILON = 0.001  # upstream's epsilon everywhere


def _rng(*key) -> np.random.Generator:
    """A generator seeded by the case (stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _sample(rng, shape, dtype=np.float32):
    """Upstream's np.random.random_sample(shape).astype(dtype): uniform in [0, 1)."""
    return rng.random(shape).astype(np.float64).astype(dtype)


def _tf_grads(fn, inputs, dy):
    """TensorFlow's gradients of fn(*inputs) (a tensor) w.r.t. every input, with output gradient dy
    (None for an input that fn does not use)."""
    ts = [tf.constant(v) for v in inputs]
    with tf.GradientTape() as tape:
        for t in ts:
            tape.watch(t)
        y = fn(*ts)
    return [None if g is None else g.numpy() for g in tape.gradient(y, ts, output_gradients=tf.constant(dy))]


def _per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def _y_scale(x, mean, var, scale, offset, eps, axis):
    """Size of the terms of y = (x - mean) * invstd * scale + offset: rounding is relative to it."""
    nd = x.ndim
    x64 = x.astype(np.float64)
    invstd = _per_channel(1 / np.sqrt(np.asarray(var, np.float64) + eps), nd, axis)
    s = 1.0 if scale is None else np.abs(_per_channel(scale, nd, axis))
    o = 0.0 if offset is None else np.abs(_per_channel(offset, nd, axis))
    m = _per_channel(mean, nd, axis)
    return (np.abs(x64) + np.abs(m)) * invstd * s + o


def _channel_max(x, axis):
    x64 = np.abs(x.astype(np.float64))
    return np.max(x64, axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim)) if x.size else 0.0


def test_conventions_table_names_existing_tests():
    # Every row of the README's mapping table points at a test of this module that exists, and the
    # table renders with one line per row.
    assert len(markdown_table().splitlines()) == len(CONVENTIONS) + 2
    names = set(globals())
    for row in CONVENTIONS:
        cited = [w.strip("(),") for w in row.mapping.split() if w.strip("(),").startswith("test_")]
        assert cited, row.topic
        for name in cited:
            assert name in names, (row.topic, name)


# ---------------------------------------------------------------------------------------------
# nn_batchnorm_test.py: BatchNormalizationTest (tf.nn.batch_normalization)
# ---------------------------------------------------------------------------------------------
def _tf_batch_normalization(x, m, v, beta, gamma, eps):
    return tf.nn.batch_normalization(x, m, v, beta, gamma, eps).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("use_shift", [True, False])
def test_batch_normalization(dtype, use_scale, use_shift):
    # Ports testBatchNorm: x (3, 5, 4, 2), per-channel (2,) parameters on the last axis, epsilon
    # 1e-3, with and without scale (gamma) and shift (beta); fastbn.normalize on axis -1.
    rng = _rng("bn", dtype)
    x = _sample(rng, (3, 5, 4, 2), dtype)
    m, v, beta, gamma = (_sample(rng, (2,), dtype) for _ in range(4))
    beta = beta if use_shift else None
    gamma = gamma if use_scale else None
    expected = _tf_batch_normalization(x, m, v, beta, gamma, EPSILON)
    y = fastbn.normalize(x, m, v, gamma, beta, eps=EPSILON, axis=-1)
    assert y.dtype == x.dtype
    assert_tf_close(y, expected, dtype, _y_scale(x, m, v, gamma, beta, EPSILON, -1), "y")


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("use_shift", [True, False])
def test_batch_normalization_keepdims_parameters(use_scale, use_shift):
    # Ports testBatchNormKeepDims: parameters of shape (1, 1, 1, depth), as tf.nn.moments(...,
    # keepdims=True) gives them, normalise exactly as (depth,) ones do, in TensorFlow and fastbn.
    rng = _rng("keepdims")
    x = _sample(rng, (3, 5, 4, 2))
    m, v, beta, gamma = (_sample(rng, (2,)) for _ in range(4))
    beta = beta if use_shift else None
    gamma = gamma if use_scale else None

    def k(p):
        return None if p is None else p.reshape(1, 1, 1, 2)

    expected = _tf_batch_normalization(x, k(m), k(v), k(beta), k(gamma), EPSILON)
    y_keep = fastbn.normalize(x, k(m), k(v), k(gamma), k(beta), eps=EPSILON, axis=-1)
    y_flat = fastbn.normalize(x, m, v, gamma, beta, eps=EPSILON, axis=-1)
    assert y_keep.shape == x.shape
    assert_tf_close(y_keep, expected, np.float32, _y_scale(x, m, v, gamma, beta, EPSILON, -1), "y")
    np.testing.assert_array_equal(y_keep, y_flat)


@pytest.mark.parametrize(
    ("x_shape", "param_shape", "axis"),
    [((3, 3), (1, 3), 1), ((3, 3), (3, 1), 0), ((3, 2, 4, 5), (1, 2, 1, 1), 1)],
)
def test_batch_normalization_arbitrary_shapes(x_shape, param_shape, axis):
    # Ports testBatchNormArbitraryShapes: the depth axis anywhere, parameters broadcastable to x.
    rng = _rng("arbitrary", x_shape, param_shape)
    x = _sample(rng, x_shape)
    m, v, beta, gamma = (_sample(rng, param_shape) for _ in range(4))
    for b, g in [(beta, gamma), (None, gamma), (beta, None), (None, None)]:
        expected = _tf_batch_normalization(x, m, v, b, g, EPSILON)
        y = fastbn.normalize(x, m, v, g, b, eps=EPSILON, axis=axis)
        flat = [None if p is None else p.reshape(-1) for p in (m, v, g, b)]
        assert_tf_close(y, expected, np.float32, _y_scale(x, flat[0], flat[1], flat[2], flat[3], EPSILON, axis), "y")


def test_batch_normalization_parameters_over_two_axes():
    # Ports the last case of testBatchNormArbitraryShapes: x (2, 3, 2, 4, 5), parameters
    # (1, 1, 1, 4, 5) varying over two axes.  fastbn has one channel axis: merging the two
    # (adjacent) axes of x into one of 20 channels is the mapping (tf_cases.CONVENTIONS).
    rng = _rng("two-axes")
    x = _sample(rng, (2, 3, 2, 4, 5))
    m, v, beta, gamma = (_sample(rng, (1, 1, 1, 4, 5)) for _ in range(4))
    expected = _tf_batch_normalization(x, m, v, beta, gamma, EPSILON)
    flat = [p.reshape(20) for p in (m, v, gamma, beta)]
    y = fastbn.normalize(x.reshape(2, 3, 2, 20), *flat, eps=EPSILON, axis=-1).reshape(x.shape)
    scale = _y_scale(x.reshape(2, 3, 2, 20), *flat, EPSILON, -1).reshape(x.shape)
    assert_tf_close(y, expected, np.float32, scale, "y")


@pytest.mark.parametrize(
    ("dtype", "x_shape"),
    [(np.float64, (3, 5, 4, 5)), (np.float32, (7, 5, 4, 6))],
    ids=["float64-gradient-tests", "float32-GradImpl"],
)
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("use_shift", [True, False])
def test_batch_normalization_gradients(dtype, x_shape, use_scale, use_shift):
    # Ports testBatchNormInputGradient, ...MeanGradient, ...VarianceGradient, ...BetaGradient,
    # ...GammaGradient (float64, x (3, 5, 4, 5)) and testBatchNormGradImpl (float32, (7, 5, 4, 6),
    # a random backprop): TensorFlow's gradients of tf.nn.batch_normalization w.r.t. x, mean,
    # variance, offset and scale.  fastbn's eval-mode backward (the statistics are constants there,
    # as they are inputs of tf.nn.batch_normalization) gives dx, dweight, dbias; the gradients
    # w.r.t. the statistics follow from the same per-channel sums by the chain rule:
    # dmean = -weight * invstd * sum(dy) = -weight * invstd * dbias and
    # dvar = -weight / 2 * invstd^3 * sum((x - mean) dy) = -weight / 2 * invstd^2 * dweight.
    rng = _rng("bn-grad", dtype, x_shape)
    c = x_shape[-1]
    x = _sample(rng, x_shape, dtype)
    m, v, beta, gamma = (_sample(rng, (c,), dtype) for _ in range(4))
    dy = _sample(rng, x_shape, dtype)
    beta = beta if use_shift else None
    gamma = gamma if use_scale else None

    def tf_fn(x_, m_, v_, b_, g_):
        return tf.nn.batch_normalization(x_, m_, v_, b_ if use_shift else None, g_ if use_scale else None, EPSILON)

    ones = np.ones(c, dtype)
    tdx, tdm, tdv, tdb, tdg = _tf_grads(
        tf_fn, [x, m, v, ones if beta is None else beta, ones if gamma is None else gamma], dy
    )
    _, saved = fastbn.forward(x, gamma, beta, running_mean=m, running_var=v, training=False, eps=EPSILON, axis=-1)
    dx, dweight, dbias = fastbn.backward(dy, x, gamma, saved, axis=-1)
    w = np.ones(c) if gamma is None else gamma.astype(np.float64)
    invstd = 1 / np.sqrt(v.astype(np.float64) + EPSILON)
    dmean = -w * invstd * dbias
    dvar = -0.5 * w * invstd**2 * dweight

    n = x.size // c
    y_scale = _y_scale(x, m, v, gamma, beta, EPSILON, -1)
    sum_scale = n * np.max(np.abs(dy)) * np.max(y_scale)  # a per-channel sum of n terms
    assert_tf_close(dx, tdx, dtype, np.max(np.abs(dy)) * invstd.max() * np.max(np.abs(w)), "dx")
    assert_tf_close(dmean, tdm, dtype, sum_scale * invstd.max() * np.max(np.abs(w)), "dmean")
    assert_tf_close(dvar, tdv, dtype, sum_scale * invstd.max() ** 2 * np.max(np.abs(w)), "dvar")
    if use_shift:
        assert_tf_close(dbias, tdb, dtype, sum_scale, "doffset")
    if use_scale:
        assert_tf_close(dweight, tdg, dtype, sum_scale, "dscale")


# ---------------------------------------------------------------------------------------------
# nn_batchnorm_test.py: MomentsTest and WeightedMomentsTest (tf.nn.moments, tf.nn.weighted_moments)
# ---------------------------------------------------------------------------------------------
MOMENTS_SHAPE = (2, 3, 5, 4)  # upstream's [batch, width, height, depth]
MOMENTS_AXES = ([0], [0, 1, 2], [1, 2, 3])  # testBasic, testGlobalNormalization, testAxes


def _tf_moments_f32(x, axes, keepdims, weights=None):
    """TensorFlow's moments of x computed in float32 (what TF itself does for float16; bfloat16 is
    widened exactly, since TF would otherwise accumulate in bfloat16)."""
    x32 = tf.constant(x.astype(np.float32))
    if weights is None:
        m, v = tf.nn.moments(x32, axes, keepdims=keepdims)
    else:
        m, v = tf.nn.weighted_moments(x32, axes, tf.constant(weights.astype(np.float32)), keepdims=keepdims)
    return m.numpy(), v.numpy()


def _stats_scale(x, axes, keepdims):
    return np.max(np.abs(x.astype(np.float64)), axis=tuple(axes), keepdims=keepdims)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16, np.float64])
@pytest.mark.parametrize("axes", MOMENTS_AXES, ids=["Basic", "GlobalNormalization", "Axes"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_moments_axes(dtype, axes, keepdims):
    # Ports MomentsTest.testBasic / testGlobalNormalization / testAxes (RunMomentTest): x of shape
    # (2, 3, 5, 4) drawn from N(0, 1), reduced over axes [0], [0, 1, 2] or [1, 2, 3], with and
    # without keepdims.  Upstream runs float32 and float16; bfloat16 and float64 are added.
    rng = _rng("moments", dtype)
    x = rng.standard_normal(MOMENTS_SHAPE).astype(dtype)
    mean, var = fastbn.moments(x, axes=axes, keepdims=keepdims)
    stats = np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)
    assert mean.dtype == stats and var.dtype == stats
    if np.dtype(dtype) == np.float64:
        tm, tv = (t.numpy() for t in tf.nn.moments(tf.constant(x), axes, keepdims=keepdims))
    else:
        tm, tv = _tf_moments_f32(x, axes, keepdims)
    a = _stats_scale(x, axes, keepdims)
    assert_tf_close(mean, tm, stats, a, "mean")
    assert_tf_close(var, tv, stats, a * np.sqrt(tv), "var")
    if np.dtype(dtype) == np.float16:
        # TensorFlow's own float16 result is its float32 one rounded to float16.
        hm, hv = (t.numpy() for t in tf.nn.moments(tf.constant(x), axes, keepdims=keepdims))
        assert hm.dtype == np.float16
        assert_tf_close(mean, hm, np.float16, a, "mean vs float16")
        assert_tf_close(var, hv, np.float16, a * np.sqrt(tv), "var vs float16")


@pytest.mark.parametrize(("channel_axis", "axes"), [(3, [0, 1, 2]), (-1, [0, 1, 2]), (0, [1, 2, 3])])
def test_moments_channel_axis_form(channel_axis, axes):
    # The channel-axis form of fastbn.moments is tf.nn.moments over every other axis
    # (testGlobalNormalization and testAxes once more, through fastbn's PyTorch-style argument).
    x = _rng("moments-axis").standard_normal(MOMENTS_SHAPE).astype(np.float32)
    mean, var = fastbn.moments(x, axis=channel_axis)
    tm, tv = _tf_moments_f32(x, axes, False)
    a = _stats_scale(x, axes, False)
    assert_tf_close(mean, tm, np.float32, a, "mean")
    assert_tf_close(var, tv, np.float32, a * np.sqrt(tv), "var")


def _weight_shapes(shape):
    """RunMomentTest of WeightedMomentsTest: 1:1 weights, each axis alone, each suffix of the shape."""
    out = [tuple(shape)]
    for idx in range(len(shape)):
        single = [1] * len(shape)
        single[idx] = shape[idx]
        out += [tuple(single), tuple(shape[-(idx + 1) :])]
    return out


@pytest.mark.parametrize("axes", MOMENTS_AXES, ids=["Basic", "GlobalNormalization", "Axes"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_weighted_moments(axes, keepdims):
    # Ports WeightedMomentsTest.RunWeightedMomentTest: weights |N(1, 1)| of x's shape, broadcast
    # along each single axis and as each suffix of x's shape, for every axes/keepdims of MomentsTest;
    # fastbn.moments(x, axes=..., weights=w) against tf.nn.weighted_moments (float32, and float16
    # input, whose statistics both compute in float32).
    for dtype in (np.float32, np.float16):
        for wshape in _weight_shapes(MOMENTS_SHAPE):
            rng = _rng("weighted", axes, keepdims, wshape, dtype)
            x = rng.standard_normal(MOMENTS_SHAPE).astype(dtype)
            w = np.abs(rng.normal(1.0, 1.0, wshape)).astype(np.float32)
            mean, var = fastbn.moments(x, axes=axes, keepdims=keepdims, weights=w)
            tm, tv = _tf_moments_f32(x, axes, keepdims, weights=w)
            a = _stats_scale(x, axes, keepdims)
            what = f"{np.dtype(dtype).name} weights {wshape}"
            assert_tf_close(mean, tm, np.float32, a, f"mean, {what}")
            assert_tf_close(var, tv, np.float32, a * np.sqrt(tv), f"var, {what}")


@pytest.mark.parametrize("weighted", [False, True])
def test_moments_large_mean(weighted):
    # Beyond upstream: data whose mean (1e4) is 1e7 times its spread, where float32 sums without a
    # shift lose the variance.  TensorFlow's float32 tf.nn.weighted_moments does (measured: 6e-5
    # for a true 1e-6); fastbn's float32 statistics must match TensorFlow's float64 ones on the same
    # (float32) input, to float32 accuracy relative to the variance itself.
    rng = _rng("large-mean", weighted)
    x = (rng.standard_normal((1000, 2)) * 1e-3 + 1e4).astype(np.float32)
    w = rng.random((1000, 2)).astype(np.float32) if weighted else None
    x64 = tf.constant(x.astype(np.float64))
    if weighted:
        tm, tv = (t.numpy() for t in tf.nn.weighted_moments(x64, [0], tf.constant(w.astype(np.float64))))
    else:
        tm, tv = (t.numpy() for t in tf.nn.moments(x64, [0]))
    mean, var = fastbn.moments(x, axes=[0], weights=w)
    assert_tf_close(mean, tm, np.float32, 0.0, "mean")  # rtol only: 1e-5 of 1e4
    assert_tf_close(var, tv, np.float32, 0.0, "var")  # rtol only: 1e-5 of the variance


def test_weighted_moments_constant_weight():
    # Ports WeightedMomentsTest._unweighted_moments: MomentsTest re-run with a constant weight of 1
    # (a scalar broadcast to x): the unweighted moments, in TensorFlow and fastbn.
    x = _rng("weight-one").standard_normal(MOMENTS_SHAPE).astype(np.float32)
    for axes in MOMENTS_AXES:
        mean, var = fastbn.moments(x, axes=axes, weights=np.float32(1.0))
        tm, tv = (t.numpy() for t in tf.nn.weighted_moments(tf.constant(x), axes, tf.constant(1.0)))
        um, uv = fastbn.moments(x, axes=axes)
        a = _stats_scale(x, axes, False)
        assert_tf_close(mean, tm, np.float32, a, "mean")
        assert_tf_close(var, tv, np.float32, a * np.sqrt(tv), "var")
        np.testing.assert_allclose(mean, um, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, uv, rtol=1e-5, atol=1e-6)


def test_weighted_moments_zero_weight():
    # tf.nn.weighted_moments divides with div_no_nan: a kept position whose weights are all 0 gets
    # mean 0 and variance 0.  fastbn documents the same.
    rng = _rng("zero-weight")
    x = rng.standard_normal((6, 4)).astype(np.float32)
    w = np.abs(rng.standard_normal((6, 4))).astype(np.float32)
    w[:, 2] = 0.0
    mean, var = fastbn.moments(x, axes=[0], weights=w)
    tm, tv = _tf_moments_f32(x, [0], False, weights=w)
    assert tm[2] == 0 and tv[2] == 0
    a = _stats_scale(x, [0], False)
    assert_tf_close(mean, tm, np.float32, a, "mean")
    assert_tf_close(var, tv, np.float32, a * np.sqrt(tv), "var")


def test_mask():
    # Keras's and Flax's mask= maps onto tf.nn.weighted_moments with 0/1 weights: fastbn's mask=m is
    # weights=m.  A (N, T, C) sequence batch with a (N, T) padding mask, per channel (axis=-1), and
    # the same mask broadcast to x with the reduction axes named.
    rng = _rng("mask")
    x = rng.standard_normal((4, 7, 3)).astype(np.float32)
    mask = rng.random((4, 7)) < 0.6
    tm, tv = _tf_moments_f32(x, [0, 1], False, weights=mask[..., None].astype(np.float32))
    a = _stats_scale(x, [0, 1], False)
    for mean, var in (
        fastbn.moments(x, axis=-1, mask=mask),
        fastbn.moments(x, axes=[0, 1], mask=mask[..., None]),
    ):
        assert_tf_close(mean, tm, np.float32, a, "mean")
        assert_tf_close(var, tv, np.float32, a * np.sqrt(tv), "var")


@pytest.mark.parametrize("kind", ["mask", "weights"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_weighted_batch_norm_forward_backward(kind, data_format):
    # Batch norm with statistics over the unmasked (or weighted) positions, as Keras's masked
    # BatchNormalization builds it from TensorFlow ops: tf.nn.weighted_moments(x, axes, w,
    # keepdims=True) then tf.nn.batch_normalization; TensorFlow differentiates through both.
    # fastbn.forward(mask=... / weights=...) and fastbn.backward against that, for y and for the
    # gradients w.r.t. x, scale and offset.
    rng = _rng("weighted-bn", kind, data_format)
    shape = (6, 5, 4, 3) if data_format == "NHWC" else (6, 3, 5, 4)
    axis = data_format_axis(data_format)
    reduce = tuple(i for i in range(4) if i != axis % 4)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale, offset = _sample(rng, (c,)) + 0.5, _sample(rng, (c,))
    if kind == "mask":
        m_shape = tuple(1 if i == axis % 4 else n for i, n in enumerate(shape))
        w = (rng.random(m_shape) < 0.7).astype(np.float32)
        extra = dict(mask=w.astype(bool))
    else:
        w = np.abs(rng.normal(1.0, 1.0, shape)).astype(np.float32)
        extra = dict(weights=w)
    pshape = tuple(c if i == axis % 4 else 1 for i in range(4))

    def tf_y(x_, s_, o_):
        mean, var = tf.nn.weighted_moments(x_, reduce, w, keepdims=True)
        return tf.nn.batch_normalization(x_, mean, var, tf.reshape(o_, pshape), tf.reshape(s_, pshape), EPSILON)

    ty = tf_y(tf.constant(x), tf.constant(scale), tf.constant(offset)).numpy()
    tdx, tds, tdo = _tf_grads(tf_y, [x, scale, offset], dy)
    y, saved = fastbn.forward(x, scale, offset, eps=EPSILON, axis=axis, **extra)
    dx, dscale, doffset = fastbn.backward(dy, x, scale, saved, axis=axis)
    tm, tv = _tf_moments_f32(x, list(reduce), False, weights=w)
    n = x.size // c
    assert_tf_close(y, ty, np.float32, _y_scale(x, tm, tv, scale, offset, EPSILON, axis), "y", n)
    invstd = 1 / np.sqrt(tv.astype(np.float64) + EPSILON)
    ys = np.max(_y_scale(x, tm, tv, None, None, EPSILON, axis))
    dymax = float(np.max(np.abs(dy)))
    assert_tf_close(dx, tdx, np.float32, dymax * (1 + ys * ys) * np.max(invstd * scale), "dx", n)
    assert_tf_close(dscale, tds, np.float32, n * dymax * ys, "dscale", n)
    assert_tf_close(doffset, tdo, np.float32, n * dymax, "doffset", n)


# ---------------------------------------------------------------------------------------------
# nn_fused_batchnorm_test.py (tf.compat.v1.nn.fused_batch_norm, i.e. FusedBatchNormV3)
# ---------------------------------------------------------------------------------------------
# testInferenceShape1-4/7 and testTrainingShape1-4/7 (Shape5, empty, and Shape6, one value per
# channel, are below); _runtests' data formats per rank.
FUSED_SHAPES = ([1, 1, 6, 1], [1, 1, 6, 2], [1, 2, 1, 6], [27, 131, 127, 6], [1, 2, 6, 1, 3])
FUSED_IDS = ["Shape1", "Shape2", "Shape3", "Shape4", "Shape7"]


def _formats(shape):
    return ["NHWC", "NCHW"] if len(shape) == 4 else ["NDHWC", "NCDHW"]


def _fused_case(shape, dtype, data_format, factor, with_stats):
    rng = _rng("fused", tuple(shape), np.dtype(dtype).name, data_format, factor)
    c = shape[data_format_axis(data_format)]
    x = _sample(rng, shape, dtype)
    scale, offset = _sample(rng, (c,)), _sample(rng, (c,))
    mean = var = None
    if with_stats:
        mean, var = _sample(rng, (c,)), _sample(rng, (c,))
    return x, scale, offset, mean, var


def _tf_fused(x, scale, offset, mean, var, *, data_format, is_training, factor=1.0, epsilon=EPSILON):
    y, m, v = tf.compat.v1.nn.fused_batch_norm(
        x,
        scale,
        offset,
        mean=mean,
        variance=var,
        epsilon=epsilon,
        data_format=data_format,
        is_training=is_training,
        exponential_avg_factor=factor,
    )
    return y.numpy(), m.numpy(), v.numpy()


def _tf_fused_grads(x, scale, offset, mean, var, dy, *, data_format, is_training, factor):
    """TensorFlow's gradients of fused_batch_norm's y w.r.t. x, scale and offset for output gradient dy."""

    def y(x_, s_, o_):
        return tf.compat.v1.nn.fused_batch_norm(
            x_,
            s_,
            o_,
            mean=mean,
            variance=var,
            epsilon=EPSILON,
            data_format=data_format,
            is_training=is_training,
            exponential_avg_factor=factor,
        )[0]

    return _tf_grads(y, [x, scale, offset], dy)


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: d.name)
def test_fused_inference(shape, dtype):
    # Ports _test_inference over _runtests: is_training=False normalises with the given mean and
    # variance (random in [0, 1)), epsilon 1e-3, both data formats, exponential_avg_factor 1.0 and
    # 0.6 (no effect in inference, in either library).
    # On the large Shape4 only factor 0.6, the one that could matter (it must not), to save time.
    factors = (0.6,) if np.prod(shape) > 10**5 else (1.0, 0.6)
    for data_format in _formats(shape):
        for factor in factors:
            x, scale, offset, mean, var = _fused_case(shape, dtype, data_format, factor, True)
            ty, tm, tv = _tf_fused(
                x, scale, offset, mean, var, data_format=data_format, is_training=False, factor=factor
            )
            y, m, v = fused_batch_norm(
                x, scale, offset, mean, var, data_format=data_format, is_training=False, exponential_avg_factor=factor
            )
            assert y.dtype == x.dtype == ty.dtype
            axis = data_format_axis(data_format)
            assert_tf_close(y, ty, dtype, _y_scale(x, mean, var, scale, offset, EPSILON, axis), f"y {data_format}")
            np.testing.assert_array_equal(m, tm)
            np.testing.assert_array_equal(v, tv)


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: d.name)
def test_fused_training(shape, dtype):
    # Ports _test_training over _runtests: batch statistics, epsilon 1e-3, both data formats;
    # exponential_avg_factor 1.0 (TensorFlow returns the batch mean and the Bessel-corrected batch
    # variance) and 0.6 with random old statistics (it returns their exponential average).  The
    # mapping (tf_cases.fused_batch_norm): fastbn.forward with momentum = exponential_avg_factor,
    # TensorFlow's returned statistics = fastbn's updated running statistics.
    for data_format in _formats(shape):
        axis = data_format_axis(data_format)
        for factor in (1.0, 0.6):
            x, scale, offset, mean, var = _fused_case(shape, dtype, data_format, factor, factor != 1.0)
            ty, tm, tv = _tf_fused(
                x, scale, offset, mean, var, data_format=data_format, is_training=True, factor=factor
            )
            y, m, v = fused_batch_norm(
                x, scale, offset, mean, var, data_format=data_format, is_training=True, exponential_avg_factor=factor
            )
            assert y.dtype == x.dtype == ty.dtype and m.dtype == tm.dtype == np.float32
            bm, bv = fastbn.moments(x, axis=axis)  # biased: what y is normalised with, in both
            what = f"{data_format} factor {factor}"
            n = x.size // scale.size
            assert_tf_close(y, ty, dtype, _y_scale(x, bm, bv, scale, offset, EPSILON, axis), f"y {what}", n)
            a = _channel_max(x, axis)
            assert_tf_close(m, tm, np.float32, a, f"mean {what}", n)
            assert_tf_close(v, tv, np.float32, a * np.sqrt(bv), f"variance {what}", n)


def test_fused_batch_variance_is_bessel_corrected():
    # The comment of upstream's _training_ref: tf.nn.moments divides by n, fused_batch_norm's
    # returned variance by n - 1.  Checked on the real op, since the mapping rests on it: TF's
    # returned variance times (n - 1) / n is fastbn.moments' biased variance.
    x = _sample(_rng("bessel"), (2, 3, 5, 4))
    _, _, tv = _tf_fused(
        x, np.ones(4, np.float32), np.zeros(4, np.float32), None, None, data_format="NHWC", is_training=True
    )
    n = x.size // 4
    _, bv = fastbn.moments(x, axis=-1)
    assert_tf_close(bv, tv * (n - 1) / n, np.float32, 1.0, "biased variance")
    assert not np.allclose(bv, tv, rtol=1e-3)  # and the two conventions do differ


def test_fused_running_statistics_over_steps():
    # exponential_avg_factor as momentum over several training steps: TensorFlow's returned
    # statistics fed back as the next step's old ones, against fastbn's in-place running statistics
    # (tf.raw_ops.FusedBatchNormV3 directly, whose batch_mean/batch_variance are those outputs).
    rng = _rng("steps")
    c = 3
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    tm, tv = rm.copy(), rv.copy()
    scale, offset = _sample(rng, (c,)), _sample(rng, (c,))
    for _ in range(4):
        x = (rng.standard_normal((8, 5, 5, c)) * 2 + 1).astype(np.float32)
        out = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=tm,
            variance=tv,
            epsilon=EPSILON,
            exponential_avg_factor=0.25,
            data_format="NHWC",
            is_training=True,
        )
        tm, tv = out.batch_mean.numpy(), out.batch_variance.numpy()
        fastbn.forward(x, scale, offset, running_mean=rm, running_var=rv, momentum=0.25, eps=EPSILON, axis=-1)
        assert_tf_close(rm, tm, np.float32, 8.0, "running mean")
        assert_tf_close(rv, tv, np.float32, 16.0, "running variance")


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: d.name)
def test_one_value_per_channel(dtype):
    # Ports testInferenceShape6 (x (1, 1, 1, 1)): inference is well defined and agrees.
    for data_format in ("NHWC", "NCHW"):
        x, scale, offset, mean, var = _fused_case([1, 1, 1, 1], dtype, data_format, 1.0, True)
        ty, _, _ = _tf_fused(x, scale, offset, mean, var, data_format=data_format, is_training=False)
        y, _, _ = fused_batch_norm(x, scale, offset, mean, var, data_format=data_format, is_training=False)
        assert_tf_close(y, ty, dtype, _y_scale(x, mean, var, scale, offset, EPSILON, 1), "y")


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: d.name)
def test_one_value_per_channel_in_training_raises(dtype):
    # Ports testTrainingShape6 and testBatchNormGradTrainingShape6 (x (1, 1, 1, 1), training):
    # TensorFlow returns y = offset and a variance of 0 (it divides by max(n - 1, 1)); fastbn
    # deliberately follows PyTorch, which raises ("Expected more than 1 value per channel when
    # training").  Both are checked, so that the documented difference stays true.
    x, scale, offset, _, _ = _fused_case([1, 1, 1, 1], dtype, "NHWC", 1.0, False)
    ty, tm, tv = _tf_fused(x, scale, offset, None, None, data_format="NHWC", is_training=True)
    np.testing.assert_allclose(ty.astype(np.float32).ravel(), offset, rtol=1e-2)
    assert tv[0] == 0 and tm[0] == x.astype(np.float32).ravel()[0]
    with pytest.raises(ValueError, match=r"^x: Expected more than 1 value per channel when training"):
        fused_batch_norm(x, scale, offset, data_format="NHWC", is_training=True)


@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("factor", [1.0, 0.6])
def test_fused_empty_batch(is_training, factor):
    # Ports testInferenceShape5 / testTrainingShape5 (x (0, 131, 127, 6)) and
    # testBatchNormGradInferenceShape5 / testBatchNormGradTrainingShape5 (x (0, 7, 11, 4)): an empty
    # batch gives an empty y and an empty dx, and zero dscale and doffset, in both.  In training
    # TensorFlow returns NaN statistics (NaN running statistics when exponential_avg_factor != 1);
    # fastbn deliberately leaves its running statistics untouched.
    for shape in ([0, 131, 127, 6], [0, 7, 11, 4]):
        for data_format in ("NHWC", "NCHW"):
            axis = data_format_axis(data_format)
            c = shape[axis]
            x = np.zeros(shape, np.float32)
            scale, offset = np.full(c, 2.0, np.float32), np.full(c, 0.5, np.float32)
            old_m, old_v = np.full(c, 0.25, np.float32), np.full(c, 3.0, np.float32)
            with_stats = factor != 1.0 or not is_training
            mean, var = (old_m, old_v) if with_stats else (None, None)
            ty, tm, tv = _tf_fused(
                x, scale, offset, mean, var, data_format=data_format, is_training=is_training, factor=factor
            )
            rm, rv = old_m.copy(), old_v.copy()
            y, saved = fastbn.forward(
                x,
                scale,
                offset,
                running_mean=rm,
                running_var=rv,
                training=is_training,
                momentum=factor,
                eps=EPSILON,
                axis=axis,
            )
            assert y.shape == ty.shape == tuple(shape) and y.dtype == ty.dtype
            np.testing.assert_array_equal(rm, old_m)
            np.testing.assert_array_equal(rv, old_v)
            if is_training:
                assert np.isnan(tm).all() and np.isnan(tv).all()  # TensorFlow's side of the difference
            dx, dscale, doffset = fastbn.backward(x, x, scale, saved, axis=axis)
            tdx, tds, tdo = _tf_fused_grads(
                x, scale, offset, mean, var, x, data_format=data_format, is_training=is_training, factor=factor
            )
            assert dx.shape == tdx.shape
            np.testing.assert_array_equal(dscale, tds)
            np.testing.assert_array_equal(doffset, tdo)


# testBatchNormGradInferenceShape1-4/7 and testBatchNormGradTrainingShape1-4/7.
GRAD_SHAPES = ([1, 1, 6, 1], [1, 1, 6, 2], [1, 2, 1, 6], [5, 7, 11, 4], [1, 2, 6, 1, 3])
GRAD_IDS = ["Shape1", "Shape2", "Shape3", "Shape4", "Shape7"]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=GRAD_IDS)
@pytest.mark.parametrize("is_training", [True, False], ids=["Training", "Inference"])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: d.name)
def test_fused_gradients(shape, is_training, dtype):
    # Ports _test_gradient over _runtests: the gradients of fused_batch_norm's y w.r.t. x, scale and
    # offset, training (batch statistics) and inference (given statistics: a constant normalisation),
    # both data formats, exponential_avg_factor 1.0 and 0.6 (which changes only the running
    # statistics).  Upstream compares TF's analytic gradients with numeric Jacobians; here fastbn's
    # backward is compared with TF's analytic gradients for a random output gradient dy.
    for data_format in _formats(shape):
        axis = data_format_axis(data_format)
        for factor in (1.0, 0.6):
            with_stats = not is_training or factor != 1.0
            x, scale, offset, mean, var = _fused_case(shape, dtype, data_format, factor, with_stats)
            dy = _sample(_rng("dy", tuple(shape), data_format), shape, dtype)

            tdx, tds, tdo = _tf_fused_grads(
                x, scale, offset, mean, var, dy, data_format=data_format, is_training=is_training, factor=factor
            )
            rm = np.zeros_like(scale) if mean is None else mean.copy()
            rv = np.ones_like(scale) if var is None else var.copy()
            _, saved = fastbn.forward(
                x,
                scale,
                offset,
                running_mean=rm,
                running_var=rv,
                training=is_training,
                momentum=factor,
                eps=EPSILON,
                axis=axis,
            )
            dx, dscale, doffset = fastbn.backward(dy, x, scale, saved, axis=axis)
            assert dx.dtype == x.dtype == tdx.dtype and dscale.dtype == tds.dtype == np.float32
            if is_training:
                mu, sv = fastbn.moments(x, axis=axis)
            else:
                mu, sv = mean, var
            invstd = 1 / np.sqrt(sv.astype(np.float64) + EPSILON)
            n = x.size // scale.size
            ys = np.max(_y_scale(x, mu, sv, None, None, EPSILON, axis))
            dymax = float(np.max(np.abs(dy.astype(np.float64))))
            what = f"{data_format} factor {factor}"
            # dx's terms are dy, mean(dy) and xhat * mean(dy * xhat), times scale * invstd.
            assert_tf_close(dx, tdx, dtype, dymax * (1 + ys * ys) * np.max(invstd * scale), f"dx {what}", n)
            assert_tf_close(dscale, tds, np.float32, n * dymax * ys, f"dscale {what}", n)
            assert_tf_close(doffset, tdo, np.float32, n * dymax, f"doffset {what}", n)


def test_5d_batch_norm_followed_by_relu():
    # Ports test5dBatchNormFollowedByRelu: inference on NCDHW 5-D input followed by a ReLU; fastbn
    # fuses the ReLU (activation="relu").
    rng = _rng("relu")
    x = _sample(rng, (2, 3, 2, 2, 3))
    scale, offset, mean, var = (_sample(rng, (3,)) for _ in range(4))
    offset -= 0.5  # upstream's offsets are all positive, which leaves the ReLU nothing to do
    ty, _, _ = _tf_fused(x, scale, offset, mean, var, data_format="NCDHW", is_training=False)
    expected = tf.nn.relu(ty).numpy()
    assert (expected == 0).any() and (expected > 0).any()
    y, _ = fastbn.forward(
        x, scale, offset, running_mean=mean, running_var=var, training=False, eps=EPSILON, axis=1, activation="relu"
    )
    assert_tf_close(y, expected, np.float32, _y_scale(x, mean, var, scale, offset, EPSILON, 1), "y")


@pytest.mark.parametrize(
    ("what", "scale_n", "offset_n", "mean_n", "var_n", "is_training", "factor", "tf_message", "fastbn_name"),
    [
        ("scale", 3, 2, None, None, True, 1.0, "scale must have the same number of elements", "weight"),
        ("offset", 2, 3, None, None, True, 1.0, "offset must have the same number of elements", "bias"),
        ("mean, inference", 2, 2, 0, 2, False, 1.0, "mean must have the same number of elements", "running_mean"),
        ("variance, inference", 2, 2, 2, 0, False, 1.0, "variance must have the same number of", "running_var"),
        ("mean, factor 0.5", 2, 2, 0, 2, True, 0.5, "mean must have the same number of elements", "running_mean"),
        ("variance, factor 0.5", 2, 2, 2, 0, True, 0.5, "variance must have the same number of", "running_var"),
    ],
)
def test_shape_errors(what, scale_n, offset_n, mean_n, var_n, is_training, factor, tf_message, fastbn_name):
    # Ports testEagerShapeErrors: parameters whose length is not the channel count are refused by
    # both; TensorFlow's InvalidArgumentError, fastbn's ValueError starting with the argument's name
    # (scale -> weight, offset -> bias, mean/variance -> running_mean/running_var).
    x = np.ones((2, 2, 2, 2), np.float32)
    scale, offset = np.ones(scale_n, np.float32), np.ones(offset_n, np.float32)
    mean = None if mean_n is None else np.ones(mean_n, np.float32)
    var = None if var_n is None else np.ones(var_n, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=tf_message):
        _tf_fused(x, scale, offset, mean, var, data_format="NHWC", is_training=is_training, factor=factor)
    with pytest.raises(ValueError, match=rf"^{fastbn_name}"):
        fused_batch_norm(x, scale, offset, mean, var, is_training=is_training, exponential_avg_factor=factor)


@pytest.mark.parametrize(
    ("dy_shape", "scale_n", "tf_message", "fastbn_name"),
    [((2, 2, 2, 3), 2, "x and y_backprop must have same shape", "dy"), ((2, 2, 2, 2), 3, "scale must have", "weight")],
)
def test_grad_shape_errors(dy_shape, scale_n, tf_message, fastbn_name):
    # Ports testEagerShapeGradErrors: FusedBatchNormGradV2 refuses a y_backprop whose shape is not x's
    # and a scale of the wrong length; so does fastbn.backward (dy, weight).
    x = np.ones((2, 2, 2, 2), np.float32)
    dy, scale = np.ones(dy_shape, np.float32), np.ones(scale_n, np.float32)
    stats = np.ones(2, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=tf_message):
        tf.raw_ops.FusedBatchNormGradV2(
            y_backprop=dy, x=x, scale=scale, reserve_space_1=stats, reserve_space_2=stats, epsilon=EPSILON
        )
    _, saved = fastbn.forward(x, eps=EPSILON, axis=-1)
    with pytest.raises(ValueError, match=rf"^{fastbn_name}"):
        fastbn.backward(dy, x, scale, saved, axis=-1)


@pytest.mark.parametrize("epsilon", [1e-3, 1e-5, 0.0])
def test_epsilon(epsilon):
    # TensorFlow's epsilon is fastbn's eps (added to the variance inside the square root), in
    # training and inference; TensorFlow's fused op takes epsilon=0 in training too, where fastbn
    # (as PyTorch) requires eps > 0 with batch statistics: eps=0 is admitted only in eval mode with
    # running statistics.
    rng = _rng("eps", epsilon)
    x = _sample(rng, (4, 3, 3, 5))
    scale, offset, mean, var = (_sample(rng, (5,)) for _ in range(4))
    var += 0.5  # keep var + eps well away from 0 for epsilon = 0
    ty, _, _ = _tf_fused(x, scale, offset, mean, var, data_format="NHWC", is_training=False, epsilon=epsilon)
    y, _, _ = fused_batch_norm(x, scale, offset, mean, var, is_training=False, epsilon=epsilon)
    assert_tf_close(y, ty, np.float32, _y_scale(x, mean, var, scale, offset, epsilon, -1), "y, inference")
    ty, _, _ = _tf_fused(x, scale, offset, None, None, data_format="NHWC", is_training=True, epsilon=epsilon)
    if epsilon > 0:
        y, _, _ = fused_batch_norm(x, scale, offset, is_training=True, epsilon=epsilon)
        bm, bv = fastbn.moments(x, axis=-1)
        assert_tf_close(y, ty, np.float32, _y_scale(x, bm, bv, scale, offset, epsilon, -1), "y, training")
    else:
        assert np.isfinite(ty).all()  # TensorFlow's side: accepted
        with pytest.raises(ValueError, match=r"^eps"):
            fused_batch_norm(x, scale, offset, is_training=True, epsilon=epsilon)


def test_float16_statistics_are_float32():
    # fused_batch_norm with float16 (and bfloat16) x: y in x's dtype, statistics float32 (scale and
    # offset must be float32).  fastbn keeps the same split; tf.nn.moments instead returns float16.
    for dtype in (np.float16, BFLOAT16):
        x, scale, offset, _, _ = _fused_case([2, 3, 4, 5], dtype, "NHWC", 1.0, False)
        ty, tm, tv = _tf_fused(x, scale, offset, None, None, data_format="NHWC", is_training=True)
        y, m, v = fused_batch_norm(x, scale, offset)
        assert (
            (y.dtype, m.dtype, v.dtype) == (ty.dtype, tm.dtype, tv.dtype) == (np.dtype(dtype), np.float32, np.float32)
        )
        assert fastbn.moments(x, axis=-1)[0].dtype == np.float32
        assert tf.nn.moments(tf.constant(x), [0, 1, 2])[0].dtype.as_numpy_dtype == np.dtype(dtype)


# ---------------------------------------------------------------------------------------------
# Gradients of normalize and moments w.r.t. all their inputs, through fastbn.jax
# ---------------------------------------------------------------------------------------------
def _jax_vjp(fn, inputs, dy, x64):
    """Gradients of fn(*inputs) w.r.t. every input for output cotangent dy, via jax.vjp."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(x64):
        args = [jax.numpy.asarray(v) for v in inputs]
        out, pullback = jax.vjp(fn, *args)
        cot = tuple(jax.numpy.asarray(d) for d in dy) if isinstance(out, tuple) else jax.numpy.asarray(dy)
        return [np.asarray(g) for g in pullback(cot)]


@pytest.mark.parametrize(
    ("dtype", "x_shape"),
    [(np.float64, (3, 5, 4, 5)), (np.float32, (7, 5, 4, 6))],
    ids=["float64-gradient-tests", "float32-GradImpl"],
)
@pytest.mark.parametrize("keepdims", [False, True])
def test_batch_normalization_gradients_jax(dtype, x_shape, keepdims):
    # Ports testBatchNormInputGradient, ...MeanGradient, ...VarianceGradient, ...BetaGradient,
    # ...GammaGradient and testBatchNormGradImpl once more, through fastbn.jax.normalize's own
    # gradient w.r.t. all five inputs, with (C,) parameters and (with keepdims) the (1, 1, 1, C) ones
    # of testBatchNormKeepDims; each gradient has its parameter's shape, in TensorFlow and fastbn.
    fjax = pytest.importorskip("fastbn.jax")
    rng = _rng("bn-grad-jax", dtype, x_shape)
    c = x_shape[-1]
    pshape = (1, 1, 1, c) if keepdims else (c,)
    x = _sample(rng, x_shape, dtype)
    m, v, beta, gamma = (_sample(rng, pshape, dtype) for _ in range(4))
    dy = _sample(rng, x_shape, dtype)
    expected = _tf_grads(
        lambda *a: tf.nn.batch_normalization(a[0], a[1], a[2], a[3], a[4], EPSILON), [x, m, v, beta, gamma], dy
    )
    got = _jax_vjp(
        lambda x_, m_, v_, b_, g_: fjax.normalize(x_, m_, v_, g_, b_, eps=EPSILON, axis=-1),
        [x, m, v, beta, gamma],
        dy,
        dtype == np.float64,
    )
    n = x.size // c
    flat = [p.reshape(-1) for p in (m, v, gamma, beta)]
    ys = np.max(_y_scale(x, *flat, EPSILON, -1))
    invstd = float(np.max(1 / np.sqrt(v.astype(np.float64) + EPSILON)))
    w = float(np.max(np.abs(gamma)))
    sum_scale = n * float(np.max(np.abs(dy))) * ys
    scales = [
        float(np.max(np.abs(dy))) * invstd * w,
        sum_scale * invstd * w,
        sum_scale * invstd**2 * w,
        sum_scale,
        sum_scale,
    ]
    for name, g, e, s in zip(["dx", "dmean", "dvar", "doffset", "dscale"], got, expected, scales):
        assert g.dtype == e.dtype, (name, g.dtype, e.dtype)
        assert_tf_close(g, e, dtype, s, name)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("from_y", ["mean", "var"])
def test_moments_gradient_jax(weighted, from_y):
    # Ports MomentsTest.testMeanGlobalGradient / testVarGlobalGradient (float64 x (3, 5, 4, 2),
    # axes [0, 1, 2]) and their WeightedMomentsTest form, which also differentiates w.r.t. the
    # weights (_unweighted_moments' extra_out_grads; here random positive weights instead of 1):
    # TensorFlow's gradient of tf.nn.moments / tf.nn.weighted_moments against fastbn.jax.moments'.
    fjax = pytest.importorskip("fastbn.jax")
    rng = _rng("moments-grad", weighted, from_y)
    x = _sample(rng, (3, 5, 4, 2), np.float64)
    w = np.abs(rng.normal(1.0, 1.0, (3, 5, 4, 2)))
    pick = 0 if from_y == "mean" else 1
    cot = _sample(rng, (2,), np.float64)
    if weighted:
        expected = _tf_grads(lambda x_, w_: tf.nn.weighted_moments(x_, [0, 1, 2], w_)[pick], [x, w], cot)
        got = _jax_vjp(lambda x_, w_: fjax.moments(x_, axes=[0, 1, 2], weights=w_)[pick], [x, w], cot, True)
    else:
        expected = _tf_grads(lambda x_: tf.nn.moments(x_, [0, 1, 2])[pick], [x], cot)
        got = _jax_vjp(lambda x_: fjax.moments(x_, axes=[0, 1, 2])[pick], [x], cot, True)
    for name, g, e in zip(["dx", "dweights"], got, expected):
        assert_tf_close(g, e, np.float64, np.max(np.abs(e)), f"{from_y}: {name}")
