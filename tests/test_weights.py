"""TensorFlow-style arguments of the NumPy API: reduction axes, keepdims, weights, masks, broadcast parameters.

Empty batches too.  The oracle is NumPy in float64 (and exact rational sums for the error
bound); gradients are checked against torch.autograd of the same formulas
written with torch ops.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import fastbn

RNG = np.random.default_rng(20261201)


def _weighted_oracle(x, w, reduced):
    x, w = x.astype(np.float64), np.broadcast_to(w, x.shape).astype(np.float64)
    total = w.sum(axis=reduced)
    safe = np.where(total > 0, total, 1.0)
    mean = np.where(total > 0, (w * x).sum(axis=reduced) / safe, 0.0)
    centred = x - np.expand_dims(mean, reduced)
    var = np.where(total > 0, (w * centred**2).sum(axis=reduced) / safe, 0.0)
    return mean, var, total


# ----------------------------------------------------------------- axes ---
@pytest.mark.parametrize(
    "shape, axes",
    [
        ((6, 5), [0]),
        ((4, 5, 6, 3), [0, 1, 2]),  # NHWC: the seed article's tf.nn.moments(h, [0, 1, 2])
        ((4, 3, 5, 6), [0, 2, 3]),  # NCHW
        ((4, 5, 6, 3), [0]),  # several kept axes
        ((4, 5, 6, 3), [1, 2]),
        ((4, 5, 6, 3), [0, 1, 2, 3]),  # everything: one statistic
        ((4, 5, 6), []),  # nothing: mean x, variance 0
        ((7,), [0]),
        ((4, 5, 6), -1),
    ],
)
@pytest.mark.parametrize("keepdims", [False, True])
def test_moments_over_named_axes_match_numpy(shape, axes, keepdims):
    x = (RNG.normal(size=shape) * 3 + 50).astype(np.float32)
    mean, var = fastbn.moments(x, axes=axes, keepdims=keepdims)
    reduced = tuple(np.atleast_1d(axes)) if not isinstance(axes, list) else tuple(axes)
    want_mean = x.astype(np.float64).mean(axis=reduced, keepdims=keepdims)
    want_var = x.astype(np.float64).var(axis=reduced, keepdims=keepdims)
    assert mean.shape == want_mean.shape and var.shape == want_var.shape
    assert mean.dtype == var.dtype == np.float32
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)


def test_axes_naming_one_kept_axis_is_the_channel_form():
    x = RNG.normal(size=(4, 5, 6, 3))
    for got, want in zip(fastbn.moments(x, axes=[0, 1, 2]), fastbn.moments(x, axis=-1)):
        np.testing.assert_array_equal(got, want)


def test_keepdims_results_normalise_with_broadcasting():
    x = RNG.normal(size=(4, 5, 6, 3)).astype(np.float32)
    mean, var = fastbn.moments(x, axes=[0, 1, 2], keepdims=True)
    assert mean.shape == (1, 1, 1, 3)
    y = fastbn.normalize(x, mean, var, eps=1e-3, axis=-1)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ weights and masks ---
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "shape, axis, wshape",
    [
        ((50, 3), 1, (50, 1)),  # ROWS
        ((50, 3), 1, (50, 3)),  # per-element weights, different per channel
        ((4, 3, 7), 1, (4, 1, 7)),  # SLAB
        ((4, 7, 3), -1, (1, 7, 1)),  # channels-last
    ],
)
def test_weighted_moments_match_the_weighted_formulas(dtype, shape, axis, wshape):
    x = (RNG.normal(size=shape) * 2 + 10).astype(dtype)
    w = RNG.uniform(0, 3, size=wshape)
    mean, var = fastbn.moments(x, axis, weights=w)
    reduced = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    want_mean, want_var, _ = _weighted_oracle(x, w, reduced)
    tol = 1e-6 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(mean, want_mean, rtol=tol)
    np.testing.assert_allclose(var, want_var, rtol=tol * 10)


def test_a_mask_counts_only_the_unmasked_positions():
    # Keras's padded sequences: x (N, T, C), mask (N, T).
    x = RNG.normal(size=(5, 9, 4)).astype(np.float32)
    mask = RNG.uniform(size=(5, 9)) > 0.4
    mean, var = fastbn.moments(x, axis=-1, mask=mask)
    np.testing.assert_allclose(mean, x[mask].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x[mask].var(axis=0), rtol=1e-5)
    # The same through reduction axes and a mask broadcastable to x.
    for got, want in zip(fastbn.moments(x, axes=[0, 1], mask=mask[..., None]), (mean, var)):
        np.testing.assert_array_equal(got, want)


def test_zero_weight_channels_get_zero_statistics_as_tensorflow():
    x = RNG.normal(size=(6, 3))
    w = np.array([1.0, 0.0, 2.0]) * np.ones((6, 1))
    mean, var = fastbn.moments(x, weights=w)
    assert mean[1] == 0 and var[1] == 0 and np.all(var[[0, 2]] > 0)


def test_weighted_statistics_within_the_derived_bound():
    # fastbn.backends.cpu.weighted derives |var^ - var| <= gamma_{n+4} var + (2 gamma_n R + u |mean|)^2 (plus
    # the final rounding to the statistics dtype).  float64 input, mean 1e6 times the spread: exact rational
    # sums are the reference.
    u = 2.0**-53
    for shape, axis in (((300, 2), 1), ((3, 2, 100), 1)):
        x = 1e6 + RNG.normal(size=shape)
        w = RNG.integers(0, 4, size=shape).astype(np.float64)
        mean, var = fastbn.moments(x, axis, weights=w)
        xs = np.moveaxis(x, axis, -1).reshape(-1, shape[axis])
        ws = np.moveaxis(w, axis, -1).reshape(-1, shape[axis])
        n = xs.shape[0]
        gamma = lambda k: k * u / (1 - k * u)  # noqa: E731
        for c in range(shape[axis]):
            W = sum(Fraction(v) for v in ws[:, c])
            m = sum(Fraction(a) * Fraction(b) for a, b in zip(ws[:, c], xs[:, c])) / W
            v = sum(Fraction(a) * (Fraction(b) - m) ** 2 for a, b in zip(ws[:, c], xs[:, c])) / W
            spread = float(xs[:, c].max() - xs[:, c].min())
            bound = gamma(n + 4) * float(v) + (1 + gamma(n + 4)) * (2 * gamma(n) * spread + u * abs(float(m))) ** 2
            assert abs(Fraction(float(var[c])) - v) <= Fraction(bound) + Fraction(u * float(v))
            assert abs(Fraction(float(mean[c])) - m) <= Fraction(2 * gamma(n) * spread + 2 * u * abs(float(m)))


@pytest.mark.parametrize("shape, axis", [((400, 2), 1), ((8, 3, 25), 1), ((8, 25, 3), 2)], ids=["rows", "slab", "nhwc"])
@pytest.mark.parametrize("scale, weight_scale", [(1e153, 1.0), (1e153, 1e300), (1e153, 1e-300)])
def test_weighted_statistics_whose_sums_overflow_are_finite_where_the_true_ones_are(shape, axis, scale, weight_scale):
    """Deviations of 1e153: squared (and, with weights of 1e300, weighted) sums beyond float64's range,
    so those channels are computed again, scaled (fastbn.backends.cpu.weighted); the weights' own scale,
    huge or tiny, does not matter.  Reference: exact rational sums.  Before, the variance came out inf
    and the output all bias."""
    x = RNG.normal(size=shape) * scale
    w = RNG.integers(0, 4, size=shape).astype(np.float64) * weight_scale
    mean, var = fastbn.moments(x, axis, weights=w)
    xs = np.moveaxis(x, axis, -1).reshape(-1, shape[axis])
    ws = np.moveaxis(w, axis, -1).reshape(-1, shape[axis])
    for c in range(shape[axis]):
        W = sum(Fraction(v) for v in ws[:, c])
        m = sum(Fraction(a) * Fraction(b) for a, b in zip(ws[:, c], xs[:, c])) / W
        v = sum(Fraction(a) * (Fraction(b) - m) ** 2 for a, b in zip(ws[:, c], xs[:, c])) / W
        assert np.isfinite(var[c]) and abs(Fraction(float(var[c])) - v) <= Fraction(1e-12) * v
        assert abs(Fraction(float(mean[c])) - m) <= Fraction(1e-12 * scale)
    # An all-True mask through forward: the masked kernels' statistics, the unmasked output.
    mask_shape = [1] * len(shape)
    mask_shape[0] = shape[0]
    full = np.ones(mask_shape, bool)
    channels = shape[axis]
    running = [np.zeros(channels), np.ones(channels)]
    y, saved = fastbn.forward(x, axis=axis, mask=full, running_mean=running[0], running_var=running[1], momentum=1.0)
    running0 = [np.zeros(channels), np.ones(channels)]
    y0, saved0 = fastbn.forward(x, axis=axis, running_mean=running0[0], running_var=running0[1], momentum=1.0)
    np.testing.assert_allclose(saved.invstd, saved0.invstd, rtol=1e-12)
    np.testing.assert_allclose(y, y0, rtol=1e-10, atol=1e-10)
    # The running variance takes var * (W / (W - 1)): var * W overflowed where the result is finite.
    assert np.isfinite(running[1]).all() and np.isfinite(running0[1]).all(), (running, running0)
    np.testing.assert_allclose(running, running0, rtol=1e-12)


# ---------------------------------------------------- forward and backward ---
def _torch_weighted_bn(x, w, g, b, axis, eps):
    import torch

    nd = x.ndim
    reduced = tuple(i for i in range(nd) if i != axis)
    pshape = [1] * nd
    pshape[axis] = x.shape[axis]
    total = w.sum(reduced, keepdim=True)
    mean = (w * x).sum(reduced, keepdim=True) / total
    var = (w * (x - mean) ** 2).sum(reduced, keepdim=True) / total
    return (x - mean) / torch.sqrt(var + eps) * g.reshape(pshape) + b.reshape(pshape), mean, var, total


@pytest.mark.parametrize("shape, axis", [((6, 4), 1), ((3, 4, 5), 1), ((3, 5, 4), 2)])
def test_weighted_forward_backward_and_running_update_match_autograd(shape, axis):
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=shape)
    mshape = list(shape)
    mshape[axis] = 1
    w = RNG.uniform(0.2, 2.0, size=mshape) * (RNG.uniform(size=mshape) > 0.3)
    g, b = RNG.normal(size=shape[axis]), RNG.normal(size=shape[axis])
    rm, rv = np.zeros(shape[axis]), np.ones(shape[axis])
    y, saved = fastbn.forward(x, g, b, running_mean=rm, running_var=rv, axis=axis, weights=w, momentum=0.2)
    dy = RNG.normal(size=shape)
    dx, dg, db = fastbn.backward(dy, x, g, saved, axis=axis)

    X, G, B = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    Y, mean, var, total = _torch_weighted_bn(X, torch.tensor(np.broadcast_to(w, shape).copy()), G, B, axis, 1e-5)
    Y.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, Y.detach().numpy(), atol=1e-12)
    for got, want in ((dx, X.grad), (dg, G.grad), (db, B.grad)):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-12)
    unbiased = (var * total / (total - 1)).flatten().detach().numpy()
    np.testing.assert_allclose(rm, 0.2 * mean.flatten().detach().numpy(), atol=1e-15)
    np.testing.assert_allclose(rv, 0.8 + 0.2 * unbiased, atol=1e-14)


def test_masked_forward_with_relu_and_residual_matches_autograd():
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(4, 3, 5)).astype(np.float32)
    z = RNG.normal(size=x.shape).astype(np.float32)
    mask = RNG.uniform(size=(4, 5)) > 0.4  # x's shape without the channel axis
    y, saved = fastbn.forward(x, mask=mask, activation="relu", residual=z)
    dy = RNG.normal(size=x.shape).astype(np.float32)
    dx, _, _, dz = fastbn.backward(dy, x, None, saved, y=y)
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    W = torch.tensor(np.broadcast_to(mask[:, None, :], x.shape).astype(np.float64))
    bn, *_ = _torch_weighted_bn(X, W, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1, 1e-5)
    Z = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    Y = torch.relu(bn + Z)
    Y.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(y, Y.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(dx, X.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(dz, Z.grad.numpy(), atol=1e-6)


def test_a_channel_with_weight_sum_at_most_one_keeps_its_running_statistics():
    x = RNG.normal(size=(5, 2))
    w = np.array([[1.0, 1.0]] + [[0.0, 1.0]] * 4)  # channel 0: W = 1, channel 1: W = 5
    rm, rv = np.full(2, 7.0), np.full(2, 3.0)
    fastbn.forward(x, running_mean=rm, running_var=rv, weights=w)
    assert rm[0] == 7.0 and rv[0] == 3.0
    assert rm[1] != 7.0 and rv[1] != 3.0


def test_weights_are_ignored_where_running_statistics_normalise():
    x = RNG.normal(size=(5, 2))
    rm, rv = np.zeros(2), np.ones(2)
    plain, _ = fastbn.forward(x, running_mean=rm, running_var=rv, training=False)
    weighted, saved = fastbn.forward(x, running_mean=rm, running_var=rv, training=False, weights=np.ones((5, 1)))
    np.testing.assert_array_equal(plain, weighted)
    assert saved.weights is None


# ------------------------------------------------------------ empty batch ---
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_an_empty_output_and_leaves_the_running_statistics(training):
    # As torch.nn.functional.batch_norm and TensorFlow: no error, nothing learnt.
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, training=training)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dweight, dbias = fastbn.backward(np.zeros_like(x), x, None, saved)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)
    assert fastbn.normalize(x, rm, rv).shape == x.shape
    assert np.all(np.isnan(fastbn.moments(x)[0]))


# ---------------------------------------------------- broadcast parameters ---
@pytest.mark.parametrize(
    "shape, axis, pshape",
    [
        ((4, 5, 6, 3), -1, (1, 1, 1, 3)),
        ((4, 5, 6, 3), -1, (3,)),
        ((4, 3, 5, 6), 1, (1, 3, 1, 1)),
        ((4, 3, 5, 6), 1, (3, 1, 1)),
        ((4, 3, 5, 6), 1, ()),
    ],
)
def test_normalize_takes_parameters_that_broadcast_along_the_channel_axis(shape, axis, pshape):
    x = RNG.normal(size=shape).astype(np.float32)
    c = shape[axis]
    size = int(np.prod(pshape))
    mean, var, scale, offset = (
        (RNG.normal(size=size) if i != 1 else RNG.uniform(0.5, 2, size=size)).reshape(pshape).astype(np.float16)
        for i in range(4)
    )
    y = fastbn.normalize(x, mean, var, scale, offset, eps=1e-3, axis=axis)
    bshape = [1] * len(shape)
    bshape[axis] = c
    as_b = lambda a: np.broadcast_to(a.astype(np.float64).reshape(-1), (c,)).reshape(bshape)  # noqa: E731
    want = (x - as_b(mean)) / np.sqrt(as_b(var) + 1e-3) * as_b(scale) + as_b(offset)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- errors ---
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"axis": 1, "axes": [0]}, ValueError, "axis, axes"),
        ({"axes": [0, 0]}, ValueError, "axes: an axis is given twice"),
        ({"axes": [3]}, ValueError, "axes: axis 3 is out of range"),
        ({"axes": "0"}, TypeError, "axes:"),
        ({"keepdims": "yes"}, TypeError, "keepdims"),
        ({"weights": np.ones((4, 3)), "mask": np.ones((4, 3), bool)}, ValueError, "weights, mask"),
        ({"weights": -np.ones((4, 3))}, ValueError, "weights: expected finite non-negative"),
        ({"weights": np.full((4, 3), np.nan)}, ValueError, "weights: expected finite"),
        ({"weights": np.ones((5, 3))}, ValueError, "weights: expected a shape that broadcasts"),
        ({"mask": np.ones((4, 3))}, TypeError, "mask: expected booleans"),
        ({"mask": np.ones((5,), bool)}, ValueError, "mask: expected a shape that broadcasts"),
    ],
)
def test_bad_tf_style_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastbn.moments(np.ones((4, 3), np.float32), **kwargs)


def test_bad_weights_leave_the_running_statistics_untouched():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="weights"):
        fastbn.forward(RNG.normal(size=(4, 3)), running_mean=rm, running_var=rv, weights=-np.ones((4, 1)))
    with pytest.raises(ValueError, match="mask: not supported together with virtual_batch_size"):
        fastbn.forward(
            RNG.normal(size=(4, 3)), running_mean=rm, running_var=rv, mask=np.ones(4, bool), virtual_batch_size=2
        )
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_normalize_refuses_parameters_that_vary_off_the_channel_axis():
    x = np.ones((4, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"mean: expected shape \(3,\) or one that broadcasts"):
        fastbn.normalize(x, np.ones((1, 5, 3), np.float32), np.ones(3, np.float32), axis=-1)
    with pytest.raises(TypeError, match="var: expected a floating array"):
        fastbn.normalize(x, np.ones(3, np.float32), np.ones(3, np.int64), axis=-1)


class _OneProcess:
    """A process group of one (fastbn.Collectives): what a one-process run of data-parallel training has."""

    def allgather(self, vector):
        return [np.asarray(vector)]

    def allreduce_sum(self, vector):
        return np.asarray(vector)


def test_an_empty_batch_on_every_process_is_an_empty_batch():
    # As without a process group: an empty output, the running statistics left alone, zero gradients.
    x = np.zeros((0, 3), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    y, saved = fastbn.forward(x, running_mean=rm, running_var=rv, process_group=_OneProcess())
    assert y.shape == x.shape and saved.count == 0
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    dx, dweight, dbias = fastbn.backward(x, x, None, saved)
    assert dx.shape == x.shape and not np.shares_memory(dweight, dbias)
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)


def test_a_backend_without_weighted_kernels_inherits_ones_that_raise():
    """The CUDA backend has no weighted kernels (the public functions refuse weights there first); the
    Backend protocol's default methods, which it inherits, raise NotImplementedError naming it."""
    pytest.importorskip("numba.cuda")
    from fastbn.backends.cuda.ops import CudaBackend

    backend, x = CudaBackend(), np.ones((4, 3), np.float32)
    calls = [
        lambda: backend.weighted_moments(x, x, 1),
        lambda: backend.weighted_forward(
            x, x, 1, x.dtype, None, None, 1e-5, None, None, 0.1, False, relu=False, residual=None
        ),
        lambda: backend.weighted_backward(x, x, x, None, 1, x.dtype, None, None, None),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="CudaBackend: sample weights and masks run on the CPU backend"):
            call()


@pytest.mark.parametrize("value", [1e200, 1e-320])
def test_weights_beyond_the_statistics_dtype_are_refused_before_any_update(value):
    """Finite float64 weights that float32 statistics cannot hold (1e200 would be inf: NaN statistics;
    1e-320 would be 0: a batch of zero total weight) are a ValueError naming weights, with the running
    statistics untouched; the same weights rescaled give the result."""
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"^weights: .* outside the range of float32"):
        fastbn.forward(x, weights=np.full((6, 3), value), running_mean=rm, running_var=rv)
    assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match=r"^weights: "):
        fastbn.moments(x, weights=np.full((6, 3), value))
    np.testing.assert_allclose(fastbn.forward(x, weights=np.ones((6, 3)))[0], fastbn.forward(x)[0], rtol=1e-6)


def test_running_statistics_that_alias_the_weights_are_refused():
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    w = np.ones((6, 3), np.float32)
    with pytest.raises(ValueError, match=r"^running_mean: shares memory with weights"):
        fastbn.forward(x, weights=w, running_mean=w[0], running_var=np.ones(3, np.float32))
    assert (w == 1).all()


def test_weights_whose_total_overflows_the_float64_sums_are_refused_before_anything_runs():
    """Finite weights whose sum passes float64's range (2 x 1e308) gave a wrong mean and a NaN running variance;
    they are refused, naming weights, with the running statistics untouched.  Weights of the same ratios at a
    scale that fits give the exact statistics."""
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    rm, rv = np.zeros(1), np.ones(1)
    for w in (np.array([[1e308], [1e308], [0.0], [0.0]]), np.full((4, 1), 5e307)):
        with pytest.raises(ValueError, match=r"^weights: sum to .*rescale the weights"):
            fastbn.moments(x, weights=w)
        with pytest.raises(ValueError, match=r"^weights: sum to "):
            fastbn.forward(x, running_mean=rm, running_var=rv, weights=w)
        assert rm.tolist() == [0.0] and rv.tolist() == [1.0]
    mean, var = fastbn.moments(x, weights=np.array([[1e307], [1e307], [0.0], [0.0]]))
    assert mean.tolist() == [1.5] and var.tolist() == [0.25]


def test_subnormal_float64_weights_are_refused_before_anything_runs():
    """float64 weights below the smallest normal number lose their significand in the kernels' products (equal
    weights of 5e-324 gave statistics far from the unweighted ones): refused, naming weights; float32 weights
    of 1e-45 (normal once widened to float64) give the unweighted statistics."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    for tiny in (1e-310, 5e-324):
        with pytest.raises(ValueError, match=r"^weights: positive weights below 2.23e-308"):
            fastbn.forward(x, running_mean=rm, running_var=rv, weights=np.full((4, 1), tiny))
    assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3
    x32 = x.astype(np.float32)
    mean, var = fastbn.moments(x32, weights=np.full((4, 1), 1e-45, np.float32))
    want_mean, want_var = fastbn.moments(x32)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, want_var, rtol=1e-6)
