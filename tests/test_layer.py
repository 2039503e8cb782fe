"""Tests of fastbn.layer.BatchNorm: modes, running statistics, checkpoints, gradients.

Expected values are computed here by hand in float64 NumPy from the definitions
(PyTorch semantics, /work/shared/reference/batchnorm.md), not with fastbn.  The
tests at the end compare against torch.nn.BatchNorm*d when torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn.layer import BatchNorm


# ------------------------------------------------------------- helpers ---
def batch(seed, shape=(16, 4), loc=3.0, scale=2.0, dtype=np.float32):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(dtype)


def reduce_axes(x, axis=1):
    axis %= x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def bcast(v, x, axis=1):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def hand_normalize(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1):
    """(x - mean) / sqrt(var + eps) * weight + bias in float64."""
    c = x.shape[axis % x.ndim]
    weight = np.ones(c) if weight is None else weight
    bias = np.zeros(c) if bias is None else bias
    x64 = x.astype(np.float64)
    return (x64 - bcast(mean, x, axis)) / np.sqrt(bcast(var, x, axis) + eps) * bcast(weight, x, axis) + bcast(
        bias, x, axis
    )


def hand_batch_stats(x, axis=1):
    """Batch mean, biased variance and unbiased variance in float64."""
    x64 = x.astype(np.float64)
    axes = reduce_axes(x, axis)
    n = x.size // x.shape[axis % x.ndim]
    mean = x64.mean(axis=axes)
    var = ((x64 - bcast(mean, x, axis)) ** 2).mean(axis=axes)
    return mean, var, var * n / (n - 1)


def hand_train_backward(dy, x, weight, eps=1e-5, axis=1):
    """PyTorch's training-mode gradients (dx, dweight, dbias) in float64."""
    mean, var, _ = hand_batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    axes = reduce_axes(x, axis)
    n = x.size // x.shape[axis % x.ndim]
    dy64, xc = dy.astype(np.float64), x.astype(np.float64) - bcast(mean, x, axis)
    sum_dy, dotp = dy64.sum(axis=axes), (xc * dy64).sum(axis=axes)
    k = dotp * invstd**2 / n
    dx = (dy64 - bcast(sum_dy / n, x, axis) - xc * bcast(k, x, axis)) * bcast(invstd * weight, x, axis)
    return dx, dotp * invstd, sum_dy


def assert_close(actual, expected, dtype=np.float32):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, **tol)


# ------------------------------------------------------- construction ---
def test_defaults():
    bn = BatchNorm(4)
    assert bn.num_features == 4 and bn.axis == 1 and bn.eps == 1e-5 and bn.momentum == 0.1
    assert bn.affine and bn.track_running_stats and bn.training
    for name, value in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
        array = getattr(bn, name)
        assert array.dtype == np.float32 and array.shape == (4,)
        assert np.all(array == value), name
    assert bn.num_batches_tracked == 0
    assert bn.grad_weight is None and bn.grad_bias is None
    assert repr(bn) == (
        "BatchNorm(4, axis=1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, dtype=float32)"
    )


def test_float64_layer():
    bn = BatchNorm(3, dtype="float64")
    assert bn.dtype == np.float64
    assert all(getattr(bn, k).dtype == np.float64 for k in ("weight", "bias", "running_mean", "running_var"))


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_num_features_not_positive_is_value_error(bad):
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(bad)


@pytest.mark.parametrize("bad", [2.5, 4.0, "4", None, True, np.array([4, 5])])
def test_num_features_not_integer_is_type_error(bad):
    with pytest.raises(TypeError, match="num_features"):
        BatchNorm(bad)


def test_num_features_accepts_numpy_integer():
    assert BatchNorm(np.int64(5)).weight.shape == (5,)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="1e-5"), TypeError, "eps"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(momentum="0.1"), TypeError, "momentum"),
        (dict(momentum=True), TypeError, "momentum"),
        (dict(affine=1), TypeError, "affine"),
        (dict(track_running_stats="yes"), TypeError, "track_running_stats"),
        (dict(axis=1.0), TypeError, "axis"),
        (dict(axis=True), TypeError, "axis"),
        (dict(dtype=np.float16), ValueError, "dtype"),
        (dict(dtype=np.int32), ValueError, "dtype"),
        (dict(dtype="not a dtype"), TypeError, "dtype"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        BatchNorm(3, **kwargs)


def test_num_features_is_keyword_free_but_options_are_keyword_only():
    with pytest.raises(TypeError):
        BatchNorm(3, 1)  # axis must be given by name


# ------------------------------------------------------ forward modes ---
def test_training_forward_uses_batch_stats_and_updates_running_stats():
    bn = BatchNorm(4, momentum=0.1)
    x = batch(0)
    y = bn(x)
    mean, var, unbiased = hand_batch_stats(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert_close(y, hand_normalize(x, mean, var))
    assert_close(bn.running_mean, 0.9 * 0 + 0.1 * mean)
    assert_close(bn.running_var, 0.9 * 1 + 0.1 * unbiased)
    assert bn.num_batches_tracked == 1


def test_call_is_forward():
    a, b = BatchNorm(4), BatchNorm(4)
    x = batch(1)
    np.testing.assert_array_equal(a(x), b.forward(x))
    np.testing.assert_array_equal(a.running_var, b.running_var)


def test_eval_uses_running_stats_and_changes_nothing():
    bn = BatchNorm(4)
    bn.weight[...] = [1.0, 2.0, 0.5, -1.0]
    bn.bias[...] = [0.0, 1.0, -1.0, 3.0]
    for seed in range(3):
        bn(batch(seed))
    assert bn.eval() is bn and not bn.training
    rm, rv, count = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    x = batch(10, loc=-7.0)
    y = bn(x)
    assert_close(y, hand_normalize(x, rm, rv, bn.weight, bn.bias))
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == count


def test_train_switch():
    bn = BatchNorm(2)
    assert bn.train(False) is bn and not bn.training
    assert bn.train() is bn and bn.training
    bn.eval()
    bn.train(True)
    assert bn.training
    with pytest.raises(TypeError, match="mode"):
        bn.train("no")


def test_momentum_none_is_cumulative_average():
    bn = BatchNorm(4, momentum=None)
    # Different sizes: a cumulative average of batch statistics weighs batches
    # equally whatever their size, which is what PyTorch does.
    xs = [batch(0, (5, 4)), batch(1, (12, 4), loc=-2.0), batch(2, (7, 4), scale=5.0)]
    means, unbiased = [], []
    for x in xs:
        bn(x)
        mean, _, uvar = hand_batch_stats(x)
        means.append(mean)
        unbiased.append(uvar)
    # By hand, with m_k = 1/k: r1 = s1, r2 = r1/2 + s2/2, r3 = 2/3 r2 + s3/3.
    expected_mean = (means[0] + means[1] + means[2]) / 3
    expected_var = (unbiased[0] + unbiased[1] + unbiased[2]) / 3
    assert_close(bn.running_mean, expected_mean)
    assert_close(bn.running_var, expected_var)
    assert bn.num_batches_tracked == 3


def test_momentum_none_continues_from_loaded_counter():
    bn = BatchNorm(2, momentum=None, dtype=np.float64)
    bn.load_state_dict(
        {
            "weight": np.ones(2),
            "bias": np.zeros(2),
            "running_mean": np.array([1.0, -1.0]),
            "running_var": np.array([2.0, 3.0]),
            "num_batches_tracked": np.array(4),
        }
    )
    x = batch(3, (6, 2), dtype=np.float64)
    bn(x)
    mean, _, uvar = hand_batch_stats(x)
    # The 5th batch gets weight 1/5.
    assert_close(bn.running_mean, 0.8 * np.array([1.0, -1.0]) + 0.2 * mean, np.float64)
    assert_close(bn.running_var, 0.8 * np.array([2.0, 3.0]) + 0.2 * uvar, np.float64)
    assert bn.num_batches_tracked == 5


def test_momentum_none_eval_changes_nothing():
    bn = BatchNorm(3, momentum=None)
    bn(batch(0, (8, 3)))
    state = bn.state_dict()
    bn.eval()
    bn(batch(1, (8, 3)))
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_failed_forward_changes_nothing():
    bn = BatchNorm(3)
    bn(batch(0, (8, 3)))
    state = bn.state_dict()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(batch(1, (1, 3)))  # one value per channel in training, as PyTorch
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_one_sample_is_fine_in_eval_mode():
    bn = BatchNorm(3).eval()
    x = batch(0, (1, 3))
    assert_close(bn(x), hand_normalize(x, np.zeros(3), np.ones(3)))


@pytest.mark.parametrize(
    "x, error, match",
    [
        (batch(0, (8, 5)), ValueError, "channels"),
        (batch(0, (8,)), ValueError, "dimensions"),
        (batch(0, (8, 4), dtype=np.float64), TypeError, "float64"),
        (batch(0, (8, 4)).astype(np.int32), TypeError, "int32"),
        ([[1.0, 2.0, 3.0, 4.0]] * 3, TypeError, "array"),
    ],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        BatchNorm(4)(x)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis"):
        BatchNorm(4, axis=3)(batch(0, (8, 4)))


def test_float16_input():
    bn = BatchNorm(4)
    x = batch(0, (32, 4)).astype(np.float16)
    y = bn(x)
    assert y.dtype == np.float16
    mean, var, _ = hand_batch_stats(x)
    np.testing.assert_allclose(y.astype(np.float64), hand_normalize(x, mean, var), atol=5e-3)
    bn.backward(np.ones_like(y))
    assert bn.grad_weight.dtype == np.float32 and bn.grad_bias.dtype == np.float32


def test_channels_last_matches_channels_first():
    nchw = batch(4, (3, 5, 4, 2))
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    first, last = BatchNorm(5), BatchNorm(5, axis=-1)
    y_first, y_last = first(nchw), last(nhwc)
    np.testing.assert_allclose(y_last.transpose(0, 3, 1, 2), y_first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last.running_var, first.running_var, rtol=1e-6)
    dy = batch(5, nchw.shape)
    dx_first = first.backward(dy)
    dx_last = last.backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(dx_last.transpose(0, 3, 1, 2), dx_first, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last.grad_weight, first.grad_weight, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------- backward ---
def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward"):
        BatchNorm(3).backward(np.ones((4, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_training_matches_hand_formula_and_functional_api(dtype):
    bn = BatchNorm(4, dtype=dtype)
    bn.weight[...] = [1.5, -0.5, 2.0, 1.0]
    bn.bias[...] = [0.1, 0.2, 0.3, 0.4]
    x, dy = batch(0, (10, 4, 3), dtype=dtype), batch(1, (10, 4, 3), loc=0.0, dtype=dtype)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn(x)
    dx = bn.backward(dy)

    ref_dx, ref_dw, ref_db = hand_train_backward(dy, x, bn.weight.astype(np.float64))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, ref_dx, dtype)
    assert_close(bn.grad_weight, ref_dw, dtype)
    assert_close(bn.grad_bias, ref_db, dtype)

    _, saved = fastbn.forward(x, bn.weight, bn.bias, running_mean=rm, running_var=rv, training=True)
    f_dx, f_dw, f_db = fastbn.backward(dy, x, bn.weight, saved)
    np.testing.assert_array_equal(dx, f_dx)
    np.testing.assert_array_equal(bn.grad_weight, f_dw)
    np.testing.assert_array_equal(bn.grad_bias, f_db)


def test_backward_eval_mode_treats_stats_as_constants():
    bn = BatchNorm(4, dtype=np.float64)
    bn.weight[...] = [2.0, 1.0, -1.0, 0.5]
    bn.running_mean[...] = [1.0, 2.0, 3.0, 4.0]
    bn.running_var[...] = [0.5, 1.0, 2.0, 4.0]
    bn.eval()
    x, dy = batch(2, dtype=np.float64), batch(3, loc=0.0, dtype=np.float64)
    bn(x)
    dx = bn.backward(dy)
    invstd = 1.0 / np.sqrt(bn.running_var + bn.eps)
    assert_close(dx, dy * invstd * bn.weight, np.float64)
    assert_close(bn.grad_weight, ((x - bn.running_mean) * dy).sum(axis=0) * invstd, np.float64)
    assert_close(bn.grad_bias, dy.sum(axis=0), np.float64)


def test_backward_uses_latest_forward():
    bn = BatchNorm(3)
    x1, x2 = batch(0, (6, 3)), batch(1, (9, 3))
    bn(x1)
    bn(x2)
    dy = batch(2, (9, 3))
    dx = bn.backward(dy)
    ref_dx, _, _ = hand_train_backward(dy, x2, np.ones(3))
    assert_close(dx, ref_dx)


def test_parameters_and_gradients_pair_up():
    bn = BatchNorm(4)
    params = bn.parameters()
    assert params[0] is bn.weight and params[1] is bn.bias
    with pytest.raises(RuntimeError, match="backward"):
        bn.gradients()
    bn(batch(0))
    bn.backward(batch(1, loc=0.0))
    grads = bn.gradients()
    assert grads[0] is bn.grad_weight and grads[1] is bn.grad_bias
    assert [p.shape for p in params] == [g.shape for g in grads]
    assert [p.dtype for p in params] == [g.dtype for g in grads]

    # An SGD step through the pairs updates the layer itself.
    before = [p.copy() for p in params]
    for p, g in zip(bn.parameters(), bn.gradients()):
        p -= 0.5 * g
    np.testing.assert_allclose(bn.weight, before[0] - 0.5 * bn.grad_weight)
    np.testing.assert_allclose(bn.bias, before[1] - 0.5 * bn.grad_bias)


# ------------------------------------------------------- affine=False ---
def test_affine_false():
    bn = BatchNorm(4, affine=False)
    assert bn.weight is None and bn.bias is None
    assert bn.parameters() == [] and bn.gradients() == []
    assert list(bn.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    x, dy = batch(0), batch(1, loc=0.0)
    y = bn(x)
    mean, var, _ = hand_batch_stats(x)
    assert_close(y, hand_normalize(x, mean, var))
    dx = bn.backward(dy)
    assert_close(dx, hand_train_backward(dy, x, np.ones(4))[0])
    assert bn.grad_weight is None and bn.grad_bias is None
    assert bn.gradients() == []


# ------------------------------------------ track_running_stats=False ---
def test_no_running_stats_uses_batch_stats_in_both_modes():
    bn = BatchNorm(4, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    x = batch(0)
    y_train = bn(x)
    y_eval = bn.eval()(x)
    mean, var, _ = hand_batch_stats(x)
    assert_close(y_train, hand_normalize(x, mean, var))
    np.testing.assert_array_equal(y_eval, y_train)
    # Batch statistics in eval mode: backward uses the training formula.
    dy = batch(1, loc=0.0)
    assert_close(bn.backward(dy), hand_train_backward(dy, x, np.ones(4))[0])


def test_no_running_stats_momentum_none():
    bn = BatchNorm(3, momentum=None, track_running_stats=False)
    x = batch(0, (5, 3))
    mean, var, _ = hand_batch_stats(x)
    assert_close(bn(x), hand_normalize(x, mean, var))


def test_a_count_of_none_is_not_counted_and_the_momentum_used_as_torch():
    """torch.nn.BatchNorm accepts ``num_batches_tracked = None`` (no counting); so does the layer."""
    bn = BatchNorm(3)
    bn.num_batches_tracked = None
    x = batch(0, (5, 3))
    mean, _var, unbiased = hand_batch_stats(x)
    bn(x)
    assert bn.num_batches_tracked is None
    assert_close(bn.running_mean, 0.1 * mean)
    assert_close(bn.running_var, 0.9 + 0.1 * unbiased)
    torch = pytest.importorskip("torch")  # the behaviour copied: torch's module with the count set to None
    theirs = torch.nn.BatchNorm1d(3)
    theirs.num_batches_tracked = None
    theirs(torch.from_numpy(x))
    assert theirs.num_batches_tracked is None
    np.testing.assert_allclose(bn.running_mean, theirs.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, theirs.running_var.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "attribute, value, error, message",
    [
        ("num_batches_tracked", "a", TypeError, "num_batches_tracked: expected None or a non-negative int"),
        ("num_batches_tracked", 1.5, TypeError, "num_batches_tracked: expected None or a non-negative int"),
        ("num_batches_tracked", True, TypeError, "num_batches_tracked: expected None or a non-negative int"),
        ("num_batches_tracked", -1, TypeError, "num_batches_tracked: expected None or a non-negative int"),
        ("axis", "1", TypeError, "axis: expected an int"),
        ("axis", 1.0, TypeError, "axis: expected an int"),
    ],
)
def test_attributes_assigned_after_construction_are_checked_before_any_update(attribute, value, error, message):
    """Before, a bare AssertionError (count None with tracking), or an error from inside Python naming nothing."""
    bn = BatchNorm(3)
    setattr(bn, attribute, value)
    before = (bn.running_mean.copy(), bn.running_var.copy(), bn.weight.copy(), bn.bias.copy())
    with pytest.raises(error, match=message):
        bn(batch(0, (5, 3)))
    for now, then in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias), before):
        np.testing.assert_array_equal(now, then)
    assert getattr(bn, attribute) is value


def test_a_count_of_none_with_momentum_none_is_refused_by_name():
    bn = BatchNorm(3, momentum=None)
    bn.num_batches_tracked = None
    with pytest.raises(ValueError, match="num_batches_tracked: None with momentum=None"):
        bn(batch(0, (5, 3)))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3, np.float32))


# ------------------------------------------------------------ state ---
def trained_layer(**kwargs):
    bn = BatchNorm(4, **kwargs)
    rng = np.random.default_rng(7)
    if bn.affine:
        bn.weight[...] = rng.uniform(0.5, 2.0, 4)
        bn.bias[...] = rng.normal(size=4)
    for seed in range(3):
        bn(batch(seed))
    return bn


def test_state_dict_keys_values_and_copies():
    bn = trained_layer()
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert isinstance(state[key], np.ndarray) and state[key].dtype == np.float32
        np.testing.assert_array_equal(state[key], getattr(bn, key))
        assert not np.shares_memory(state[key], getattr(bn, key))
    count = state["num_batches_tracked"]
    assert isinstance(count, np.ndarray) and count.shape == () and count.dtype == np.int64 and count == 3
    state["weight"][...] = 99.0
    assert not np.any(bn.weight == 99.0)


def test_state_dict_prefix():
    state = trained_layer().state_dict(prefix="features.1.")
    assert sorted(state) == sorted(
        "features.1." + k for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    )


def test_state_dict_round_trip():
    source = trained_layer()
    target = BatchNorm(4)
    ids = [id(a) for a in target.parameters()] + [id(target.running_mean), id(target.running_var)]
    assert target.load_state_dict(source.state_dict()) == ([], [])
    # Copied in place: references an optimizer holds stay valid.
    assert ids == [id(a) for a in target.parameters()] + [id(target.running_mean), id(target.running_var)]
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    x = batch(20)
    np.testing.assert_array_equal(source.eval()(x), target.eval()(x))


def test_load_numpy_dict_with_torch_keys():
    # What a torch BatchNorm1d(3) checkpoint holds, as plain NumPy (float64
    # arrays, a NumPy int64 count): values are cast to the layer's dtype.
    state = {
        "weight": np.array([1.0, 2.0, 3.0]),
        "bias": np.array([-1.0, 0.0, 1.0]),
        "running_mean": np.array([0.5, 0.25, -0.5]),
        "running_var": np.array([1.5, 2.0, 0.25]),
        "num_batches_tracked": np.int64(17),
    }
    bn = BatchNorm(3)
    bn.load_state_dict(state)
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(bn, key).dtype == np.float32
        np.testing.assert_array_equal(getattr(bn, key), state[key].astype(np.float32))
    assert bn.num_batches_tracked == 17 and isinstance(bn.num_batches_tracked, int)
    x = batch(0, (6, 3))
    assert_close(
        bn.eval()(x),
        hand_normalize(x, state["running_mean"], state["running_var"], state["weight"], state["bias"]),
    )


def test_load_plain_python_values():
    bn = BatchNorm(2, dtype=np.float64)
    bn.load_state_dict(
        {
            "weight": [2.0, 3.0],
            "bias": [0, 1],
            "running_mean": [0.0, 0.0],
            "running_var": [1.0, 1.0],
            "num_batches_tracked": 5,
        }
    )
    np.testing.assert_array_equal(bn.weight, [2.0, 3.0])
    assert bn.num_batches_tracked == 5


def test_load_strict_errors_and_non_strict_report():
    state = trained_layer().state_dict()
    bn = BatchNorm(4)
    before = bn.state_dict()

    missing = {k: v for k, v in state.items() if k != "running_var"}
    with pytest.raises(KeyError, match="running_var"):
        bn.load_state_dict(missing)
    extra = dict(state, extra=np.zeros(4))
    with pytest.raises(KeyError, match="extra"):
        bn.load_state_dict(extra)
    for key, value in bn.state_dict().items():  # nothing was loaded
        np.testing.assert_array_equal(value, before[key])

    assert bn.load_state_dict(missing, strict=False) == (["running_var"], [])
    np.testing.assert_array_equal(bn.running_mean, state["running_mean"])
    np.testing.assert_array_equal(bn.running_var, np.ones(4, np.float32))  # kept
    assert bn.load_state_dict(extra, strict=False) == ([], ["extra"])


def test_load_without_count_keeps_counter():
    # Checkpoints from PyTorch < 0.4.1 have no num_batches_tracked.
    state = trained_layer().state_dict()
    del state["num_batches_tracked"]
    bn = BatchNorm(4)
    bn(batch(0))
    bn.load_state_dict(state)
    assert bn.num_batches_tracked == 1


def test_load_bad_values_change_nothing():
    good = trained_layer().state_dict()
    bn = BatchNorm(4)
    before = bn.state_dict()
    cases = [
        (dict(good, running_var=np.ones(5)), ValueError, "running_var"),
        (dict(good, weight=np.ones((4, 1))), ValueError, "weight"),
        (dict(good, bias=np.array(["a"] * 4)), ValueError, "bias"),
        (dict(good, num_batches_tracked=np.array(2.5)), ValueError, "num_batches_tracked"),
        (dict(good, num_batches_tracked=-1), ValueError, "num_batches_tracked"),
    ]
    for state, error, key in cases:
        with pytest.raises(error, match=key):
            bn.load_state_dict(state)
        for k, value in bn.state_dict().items():
            np.testing.assert_array_equal(value, before[k])
    with pytest.raises(TypeError, match="state_dict"):
        bn.load_state_dict([("weight", np.ones(4))])


def test_load_with_prefix_picks_one_layer():
    model = {}
    model.update(trained_layer().state_dict(prefix="bn1."))
    source = trained_layer(momentum=0.5)
    model.update(source.state_dict(prefix="bn2."))
    model["fc.weight"] = np.zeros((4, 4))
    bn = BatchNorm(4)
    assert bn.load_state_dict(model, prefix="bn2.") == ([], [])
    np.testing.assert_array_equal(bn.running_mean, source.running_mean)


def test_load_across_configurations():
    full = trained_layer().state_dict()
    # A torch BatchNorm(affine=False) checkpoint has no weight or bias.
    no_affine = BatchNorm(4, affine=False)
    with pytest.raises(KeyError, match="weight"):
        no_affine.load_state_dict(full)
    no_affine.load_state_dict({k: full[k] for k in ("running_mean", "running_var", "num_batches_tracked")})
    np.testing.assert_array_equal(no_affine.running_var, full["running_var"])

    no_stats = BatchNorm(4, track_running_stats=False)
    with pytest.raises(KeyError, match="running_mean"):
        no_stats.load_state_dict(full)
    no_stats.load_state_dict({k: full[k] for k in ("weight", "bias")})
    np.testing.assert_array_equal(no_stats.weight, full["weight"])


def test_reset():
    bn = trained_layer()
    weight = bn.weight
    bn.reset_running_stats()
    assert np.all(bn.running_mean == 0) and np.all(bn.running_var == 1) and bn.num_batches_tracked == 0
    assert not np.all(bn.weight == 1)
    bn.reset_parameters()
    assert bn.weight is weight and np.all(bn.weight == 1) and np.all(bn.bias == 0)


# --------------------------------------------------------------- torch ---
def test_torch_batchnorm1d_checkpoint_loads():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
    for seed in range(4):
        ref(torch.from_numpy(batch(seed, (12, 5))))
    ref.eval()

    bn = BatchNorm(5)
    bn.load_state_dict(ref.state_dict())  # torch tensors, incl. the 0-d int64 counter
    assert bn.num_batches_tracked == 4
    np.testing.assert_array_equal(bn.running_var, ref.running_var.numpy())

    x = batch(9, (7, 5), loc=1.0)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn.eval()(x), expected, rtol=1e-5, atol=1e-5)

    # And the other way: our state_dict, as tensors, loads into torch.
    back = torch.nn.BatchNorm1d(5)
    back.load_state_dict({k: torch.as_tensor(v) for k, v in bn.state_dict().items()})
    assert int(back.num_batches_tracked) == 4
    np.testing.assert_array_equal(back.running_mean.numpy(), bn.running_mean)


def test_torch_momentum_none_matches():
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm1d(3, momentum=None)
    bn = BatchNorm(3, momentum=None)
    for seed, n in enumerate([4, 9, 2, 16]):
        x = batch(seed, (n, 3), loc=seed)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(bn(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked == int(ref.num_batches_tracked)


@pytest.mark.parametrize("training", [True, False])
def test_torch_batchnorm2d_forward_backward(training):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    bn = BatchNorm(3, dtype=np.float64)
    bn.load_state_dict(ref.state_dict())
    ref.train(training)
    bn.train(training)

    x = batch(0, (4, 3, 5, 6), dtype=np.float64)
    dy = batch(1, x.shape, loc=0.0, dtype=np.float64)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = ref(tx)
    ty.backward(torch.from_numpy(dy))

    y = bn(x)
    dx = bn.backward(dy)
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.grad_weight, ref.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.grad_bias, ref.bias.grad.numpy(), **tol)
    np.testing.assert_allclose(bn.running_mean, ref.running_mean.numpy(), **tol)
    np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), **tol)
    assert bn.num_batches_tracked == int(ref.num_batches_tracked)


def test_a_state_dict_with_missing_keys_is_a_value_error_too():
    """Every bad argument of fastbn is a TypeError or ValueError; a state_dict's missing or unexpected
    keys are a KeyError (as a mapping's are) that is also a ValueError, with a readable message."""
    state = fastbn.BatchNorm(3).state_dict()
    del state["running_var"]
    with pytest.raises(ValueError, match=r"^state_dict: missing keys \['running_var'\]") as caught:
        fastbn.BatchNorm(3).load_state_dict(state)
    assert isinstance(caught.value, KeyError)


def test_an_interrupt_after_the_kernel_puts_the_statistics_count_and_cached_input_back(monkeypatch):
    """The kernel updates the running statistics in place and the count is stored after it returns; a
    KeyboardInterrupt (or a signal handler's exception) landing in between must not leave a count that
    disagrees with the statistics.  Simulated here at that exact point: the layer undoes the update, so the
    interrupted call changes nothing, and backward still uses the last completed forward's input."""
    layer = BatchNorm(3)
    first = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    layer(first)
    before = (layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked)
    real = fastbn.layer._forward

    def interrupted_after_the_kernel(*args, **kwargs):
        real(*args, **kwargs)  # the running statistics are updated by now
        raise KeyboardInterrupt

    monkeypatch.setattr(fastbn.layer, "_forward", interrupted_after_the_kernel)
    with pytest.raises(KeyboardInterrupt):
        layer(first * 3 + 1)
    assert layer.running_mean.tobytes() == before[0].tobytes()
    assert layer.running_var.tobytes() == before[1].tobytes()
    assert layer.num_batches_tracked == before[2] == 1
    monkeypatch.undo()
    dy = np.random.default_rng(1).standard_normal(first.shape).astype(np.float32)
    reference = BatchNorm(3)
    reference(first)
    assert layer.backward(dy).tobytes() == reference.backward(dy).tobytes()  # the first batch's gradient
    layer(first)  # and the next call counts on from there
    assert layer.num_batches_tracked == 2
