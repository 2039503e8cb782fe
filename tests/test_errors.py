"""Every bad input: the exception type, a message that names the argument, and running
statistics left bit-for-bit untouched whenever they were passed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastbn

from oracle import oracle_normalize
from strategies import BFLOAT16, assert_close, output_tol, stats_dtype, stats_tol, y_scale

DTYPES = [np.float16, BFLOAT16, np.float32, np.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
C = 3
ONE_VALUE = "Expected more than 1 value per channel when training"


def names(argument):
    """A regex matching the argument's name as a word, in any case (`saved` matches 'Saved')."""
    return rf"(?i)(?<![A-Za-z0-9_]){argument}(?![A-Za-z0-9_])"


def other_stats_dtype(sd):
    """A float dtype that is not the stats dtype sd."""
    return np.dtype(np.float64) if sd == np.float32 else np.dtype(np.float32)


def good_forward_args(dtype):
    rng = np.random.default_rng(0)
    sd = stats_dtype(dtype)
    return dict(
        x=rng.standard_normal((4, C, 5)).astype(dtype),
        weight=rng.uniform(0.5, 2.0, C).astype(sd),
        bias=rng.normal(size=C).astype(sd),
        running_mean=rng.normal(size=C).astype(sd),
        running_var=rng.uniform(0.5, 2.0, C).astype(sd),
        training=True,
        momentum=0.1,
        eps=1e-5,
        axis=1,
    )


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _set(**changes):
    return lambda a: {**a, **{k: (v(a) if callable(v) else v) for k, v in changes.items()}}


def _retype(name, dtype=None):
    """Give argument `name` a wrong dtype (by default a float dtype other than the stats dtype)."""
    return lambda a: {**a, name: a[name].astype(dtype or other_stats_dtype(a[name].dtype))}


def _reshape(name, shape_of):
    return lambda a: {**a, name: np.resize(a[name], shape_of(a[name].shape[0]))}


# (id, exception, argument named in the message, change to the good arguments)
FORWARD_ERRORS = [
    ("x-int32", TypeError, "x", _set(x=lambda a: np.arange(60, dtype=np.int32).reshape(4, C, 5))),
    ("x-int64", TypeError, "x", _set(x=lambda a: np.arange(60).reshape(4, C, 5))),
    ("x-uint8", TypeError, "x", _set(x=lambda a: np.ones((4, C, 5), np.uint8))),
    ("x-bool", TypeError, "x", _set(x=lambda a: np.ones((4, C, 5), bool))),
    ("x-complex64", TypeError, "x", _set(x=lambda a: a["x"].astype(np.complex64))),
    ("x-complex128", TypeError, "x", _set(x=lambda a: a["x"].astype(np.complex128))),
    ("x-object", TypeError, "x", _set(x=lambda a: a["x"].astype(object))),
    ("x-1d", ValueError, "x", _set(x=lambda a: a["x"][0, 0], axis=0)),
    ("x-0d", ValueError, "x", _set(x=lambda a: a["x"][0, 0, 0], axis=0)),
    ("axis-too-big", ValueError, "axis", _set(axis=3)),
    ("axis-too-negative", ValueError, "axis", _set(axis=-4)),
    ("axis-float", TypeError, "axis", _set(axis=1.0)),
    ("axis-str", TypeError, "axis", _set(axis="1")),
    ("axis-none", TypeError, "axis", _set(axis=None)),
    ("weight-long", ValueError, "weight", _reshape("weight", lambda c: (c + 1,))),
    ("weight-short", ValueError, "weight", _reshape("weight", lambda c: (c - 1,))),
    ("weight-2d", ValueError, "weight", _reshape("weight", lambda c: (1, c))),
    ("weight-dtype", TypeError, "weight", _retype("weight")),
    ("weight-float16", TypeError, "weight", _retype("weight", np.float16)),
    ("weight-int", TypeError, "weight", _retype("weight", np.int64)),
    ("bias-long", ValueError, "bias", _reshape("bias", lambda c: (c + 1,))),
    ("bias-2d", ValueError, "bias", _reshape("bias", lambda c: (c, 1))),
    ("bias-dtype", TypeError, "bias", _retype("bias")),
    ("running_mean-short", ValueError, "running_mean", _reshape("running_mean", lambda c: (c - 1,))),
    ("running_mean-dtype", TypeError, "running_mean", _retype("running_mean")),
    ("running_var-long", ValueError, "running_var", _reshape("running_var", lambda c: (c + 1,))),
    ("running_var-2d", ValueError, "running_var", _reshape("running_var", lambda c: (1, c))),
    ("running_var-dtype", TypeError, "running_var", _retype("running_var")),
    ("running_var-float16", TypeError, "running_var", _retype("running_var", np.float16)),
    ("running_mean-read-only", ValueError, "running_mean", _set(running_mean=lambda a: _read_only(a["running_mean"]))),
    ("running_var-read-only", ValueError, "running_var", _set(running_var=lambda a: _read_only(a["running_var"]))),
    ("only-running_mean", ValueError, "running_(mean|var)", _set(running_var=None)),
    ("only-running_var", ValueError, "running_(mean|var)", _set(running_mean=None)),
    (
        "no-channels",
        ValueError,
        "x",
        _set(
            x=lambda a: a["x"][:, :0],
            weight=None,
            bias=None,
            running_mean=lambda a: a["running_mean"][:0],
            running_var=lambda a: a["running_var"][:0],
        ),
    ),
    (  # an empty batch is fine, but not one without channels
        "no-channels-empty-batch",
        ValueError,
        "x",
        _set(
            x=lambda a: a["x"][:0, :0],
            weight=None,
            bias=None,
            running_mean=lambda a: a["running_mean"][:0],
            running_var=lambda a: a["running_var"][:0],
        ),
    ),
    ("empty-batch-eps-zero", ValueError, "eps", _set(x=lambda a: a["x"][:0], eps=0.0)),
    ("empty-batch-residual-shape", ValueError, "residual", _set(x=lambda a: a["x"][:0], residual=lambda a: a["x"])),
    ("empty-batch-weight-short", ValueError, "weight", _set(x=lambda a: a["x"][:0], weight=lambda a: a["weight"][:-1])),
    ("one-value-NC", ValueError, ONE_VALUE, _set(x=lambda a: a["x"][:1, :, 0])),
    ("one-value-NCHW", ValueError, ONE_VALUE, _set(x=lambda a: a["x"][:1, :, :1, None])),
    (
        "one-value-channels-last",
        ValueError,
        ONE_VALUE,
        _set(x=lambda a: np.ascontiguousarray(a["x"][:1, :, :1].transpose(0, 2, 1)), axis=-1),
    ),
    ("one-value-axis0", ValueError, ONE_VALUE, _set(x=lambda a: a["x"][:1, :, 0].T, axis=0)),
    ("eps-zero", ValueError, "eps", _set(eps=0.0)),
    (
        "eps-zero-batch-stats-in-eval",
        ValueError,
        "eps",
        _set(eps=0.0, training=False, running_mean=None, running_var=None),
    ),
    ("eps-negative", ValueError, "eps", _set(eps=-1e-5)),
    ("eps-nan", ValueError, "eps", _set(eps=float("nan"))),
    ("eps-inf", ValueError, "eps", _set(eps=float("inf"))),
    ("momentum-negative", ValueError, "momentum", _set(momentum=-0.1)),
    ("momentum-above-one", ValueError, "momentum", _set(momentum=1.5)),
    ("momentum-nan", ValueError, "momentum", _set(momentum=float("nan"))),
    ("momentum-inf", ValueError, "momentum", _set(momentum=float("inf"))),
    # fused and extended forms
    ("activation-unknown", ValueError, "activation", _set(activation="gelu")),
    ("activation-callable", TypeError, "activation", _set(activation=lambda a: max)),
    ("residual-shape", ValueError, "residual", _set(residual=lambda a: a["x"][:, :, :4])),
    (
        "residual-dtype",
        TypeError,
        "residual",
        _set(residual=lambda a: a["x"].astype(np.float64 if a["x"].dtype != np.float64 else np.float32)),
    ),
    ("residual-str", TypeError, "residual", _set(residual="z")),
    ("virtual_batch_size-not-divisor", ValueError, "virtual_batch_size", _set(virtual_batch_size=3)),
    ("virtual_batch_size-zero", ValueError, "virtual_batch_size", _set(virtual_batch_size=0)),
    ("virtual_batch_size-float", TypeError, "virtual_batch_size", _set(virtual_batch_size=2.0)),
    ("virtual_batch_size-bool", TypeError, "virtual_batch_size", _set(virtual_batch_size=True)),
    (
        "virtual_batch_size-channel-axis-0",
        ValueError,
        "virtual_batch_size",
        _set(x=lambda a: np.ascontiguousarray(a["x"].transpose(1, 0, 2)), axis=0, virtual_batch_size=1),
    ),
    ("virtual_batch_size-one-value", ValueError, ONE_VALUE, _set(x=lambda a: a["x"][:, :, :1], virtual_batch_size=1)),
    ("renorm-rmax-below-one", ValueError, "renorm", _set(renorm=(0.5, 1.0))),
    ("renorm-dmax-negative", ValueError, "renorm", _set(renorm=(2.0, -1.0))),
    ("renorm-nan", ValueError, "renorm", _set(renorm=(float("nan"), 1.0))),
    ("renorm-scalar", TypeError, "renorm", _set(renorm=3.0)),
    ("renorm-triple", TypeError, "renorm", _set(renorm=(3.0, 5.0, 1.0))),
    ("renorm-str", TypeError, "renorm", _set(renorm="35")),
    ("renorm-without-running", ValueError, "renorm", _set(renorm=(3.0, 5.0), running_mean=None, running_var=None)),
    ("renorm-with-ghost", ValueError, "renorm", _set(renorm=(3.0, 5.0), virtual_batch_size=2)),
    (
        "process_group-with-activation",
        ValueError,
        "activation",
        _set(process_group=lambda a: _OneProcess(), activation="relu"),
    ),
]


class _OneProcess:
    """A trivial one-process group (see fastbn.Collectives)."""

    def allgather(self, array):
        return [array]

    def allreduce_sum(self, array):
        return array


def _snapshot(*arrays):
    """(array, copy, bytes) for each ndarray given, to prove later that it is unchanged."""
    return [(a, a.copy(), a.tobytes()) for a in arrays if isinstance(a, np.ndarray)]


def _assert_unchanged(snapshot):
    for array, copy, raw in snapshot:
        assert np.array_equal(array, copy, equal_nan=True) and array.tobytes() == raw, "running stats were modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FORWARD_ERRORS, ids=[c[0] for c in FORWARD_ERRORS])
def test_forward_rejects(case, dtype):
    _, exc, argument, change = case
    args = change(good_forward_args(dtype))
    pattern = argument if argument == ONE_VALUE else names(argument)
    snapshot = _snapshot(args["running_mean"], args["running_var"])
    x = args.pop("x")
    with pytest.raises(exc, match=pattern):
        fastbn.forward(x, args.pop("weight"), args.pop("bias"), **args)
    _assert_unchanged(snapshot)


# (id, change to the good arguments): empty batches, accepted as in PyTorch and TensorFlow (they used to be refused)
FORWARD_EMPTY = [
    ("empty-batch", _set(x=lambda a: a["x"][:0])),
    ("empty-batch-eval", _set(x=lambda a: a["x"][:, :, :0], training=False)),
    ("empty-batch-no-running", _set(x=lambda a: a["x"][:0], running_mean=None, running_var=None)),
    ("empty-batch-eval-no-running", _set(x=lambda a: a["x"][:0], training=False, running_mean=None, running_var=None)),
    ("empty-batch-momentum-one", _set(x=lambda a: a["x"][:0], momentum=1.0)),
    ("empty-batch-no-parameters", _set(x=lambda a: a["x"][:0], weight=None, bias=None)),
    ("empty-batch-channels-last", _set(x=lambda a: np.ascontiguousarray(a["x"][:0].transpose(0, 2, 1)), axis=-1)),
    ("empty-batch-channel-axis-0", _set(x=lambda a: np.ascontiguousarray(a["x"][:0].transpose(1, 0, 2)), axis=0)),
    ("empty-batch-ghost", _set(x=lambda a: a["x"][:0], virtual_batch_size=2)),  # one empty group
    ("empty-length-ghost", _set(x=lambda a: a["x"][:, :, :0], virtual_batch_size=2)),
    ("empty-batch-renorm", _set(x=lambda a: a["x"][:0], renorm=(3.0, 5.0))),
    (
        "empty-batch-relu-residual",
        _set(x=lambda a: a["x"][:0], activation="relu", residual=lambda a: a["x"][:0].copy()),
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FORWARD_EMPTY, ids=[c[0] for c in FORWARD_EMPTY])
def test_forward_accepts_an_empty_batch(case, dtype):
    """An empty output of x's shape and dtype, NaN statistics in the Saved (a mean over no elements), the
    running statistics bit-for-bit as they were, in training too; backward then gives an empty dx (and
    dresidual) and zero dweight and dbias (sums over no elements)."""
    _, change = case
    args = change(good_forward_args(dtype))
    snapshot = _snapshot(args["running_mean"], args["running_var"])
    x, weight = args.pop("x"), args.pop("weight")
    axis = args["axis"]
    y, saved = fastbn.forward(x, weight, args.pop("bias"), **args)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == x.dtype
    _assert_unchanged(snapshot)
    sd, channels = stats_dtype(dtype), x.shape[axis]
    for stat in (saved.mean, saved.invstd):
        assert stat.dtype == sd and stat.shape == (channels,) and np.isnan(stat).all(), stat
    assert saved.batch_stats == (args["training"] or args["running_mean"] is None)
    grads = fastbn.backward(
        np.ones_like(x), x, weight, saved, axis=axis, y=y if args.get("activation") == "relu" else None
    )
    assert len(grads) == (3 if args.get("residual") is None else 4)
    for dx in (grads[0], *grads[3:]):  # dx, dresidual
        assert dx.shape == x.shape and dx.dtype == x.dtype
    for g in grads[1:3]:  # dweight, dbias
        assert g.shape == (channels,) and g.dtype == sd and not g.any(), g


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_the_good_arguments_are_accepted(dtype):
    """The baseline the error cases modify is itself valid (so each error is caused by its change),
    and the near-misses of the error cases are accepted: momentum 0 and 1, one value per channel
    in eval mode, a negative axis, eps = 0 where the running statistics normalise (as torch)."""
    args = good_forward_args(dtype)
    x = args.pop("x")
    fastbn.forward(x, args.pop("weight"), args.pop("bias"), **args)
    for change in (
        _set(momentum=0.0),
        _set(momentum=1.0),
        _set(axis=-2),
        _set(eps=1e-30),
        _set(x=lambda a: a["x"][:1, :, 0], training=False),
        _set(activation="relu", residual=lambda a: a["x"].copy()),
        _set(virtual_batch_size=2),
        _set(virtual_batch_size=4),
        _set(virtual_batch_size=1, x=lambda a: a["x"][:, :, :2]),
        _set(renorm=(1, 0)),
        _set(renorm=[float("inf"), float("inf")]),
        _set(renorm=(3.0, 5.0), training=False, running_mean=None, running_var=None),
        _set(eps=0.0, training=False),
    ):
        args = change(good_forward_args(dtype))
        x = args.pop("x")
        y, _ = fastbn.forward(x, args.pop("weight"), args.pop("bias"), **args)
        assert y.shape == x.shape


# --------------------------------------------------------------------------- backward
def _forward_for_backward(dtype, axis=1, shape=(4, C, 5)):
    args = good_forward_args(dtype)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    _, saved = fastbn.forward(x, args["weight"], args["bias"], axis=axis)
    dy = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    return dict(dy=dy, x=x, weight=args["weight"], saved=saved, axis=axis)


def _saved_from(shape, axis):
    """A Saved from forward on another input (of `shape`, channel axis `axis`)."""

    def change(a):
        other = np.random.default_rng(3).standard_normal(shape).astype(a["x"].dtype)
        return {**a, "saved": fastbn.forward(other, axis=axis)[1]}

    return change


def _square_saved_from_axis(axis):
    """x of shape (4, C, C) and a Saved from forward on that very x but with channel axis
    `axis`: same shape, same C, only the axis differs from backward's axis=1."""

    def change(a):
        x = np.random.default_rng(3).standard_normal((4, C, C)).astype(a["x"].dtype)
        dy = np.ones_like(x)
        return {**a, "x": x, "dy": dy, "saved": fastbn.forward(x, axis=axis)[1], "axis": 1}

    return change


BACKWARD_ERRORS = [
    ("dy-shape", ValueError, "dy", _set(dy=lambda a: a["dy"][:, :, :4])),
    ("dy-transposed-shape", ValueError, "dy", _set(dy=lambda a: a["dy"].transpose(0, 2, 1))),
    # not in the list of the brief, but fastbn.backward documents dy as "same shape and dtype as x"
    (
        "dy-dtype",
        TypeError,
        "dy",
        _set(dy=lambda a: a["dy"].astype(np.float64 if a["dy"].dtype != np.float64 else np.float32)),
    ),
    ("dy-int", TypeError, "dy", _set(dy=lambda a: a["dy"].astype(np.int32))),
    ("x-int", TypeError, "x", _set(x=lambda a: a["x"].astype(np.int64))),
    ("x-1d", ValueError, "x", _set(x=lambda a: a["x"][0, 0], dy=lambda a: a["dy"][0, 0], axis=0)),
    ("axis-out-of-range", ValueError, "axis", _set(axis=3)),
    ("axis-float", TypeError, "axis", _set(axis=1.0)),
    ("weight-shape", ValueError, "weight", _reshape("weight", lambda c: (c + 1,))),
    ("weight-dtype", TypeError, "weight", _retype("weight")),
    ("saved-tuple", TypeError, "saved", _set(saved=lambda a: tuple(a["saved"]))),
    ("saved-none", TypeError, "saved", _set(saved=None)),
    ("saved-dict", TypeError, "saved", _set(saved=lambda a: a["saved"]._asdict())),
    ("saved-other-shape", ValueError, "saved", _saved_from((5, C, 5), 1)),
    ("saved-other-C", ValueError, "saved", _saved_from((4, C + 1, 5), 1)),
    ("saved-other-axis", ValueError, "saved", _square_saved_from_axis(2)),
    ("saved-mean-short", ValueError, "saved", _set(saved=lambda a: a["saved"]._replace(mean=a["saved"].mean[:-1]))),
    (
        "saved-invstd-long",
        ValueError,
        "saved",
        _set(saved=lambda a: a["saved"]._replace(invstd=np.resize(a["saved"].invstd, C + 1))),
    ),
    # forward's invstd, 1 / sqrt(var + eps), is never negative: a negative one would flip dx's and dweight's signs
    (
        "saved-invstd-negative",
        ValueError,
        "saved.invstd",
        _set(saved=lambda a: a["saved"]._replace(invstd=-a["saved"].invstd)),
    ),
    ("relu-without-y", ValueError, "y", _set(saved=lambda a: a["saved"]._replace(activation="relu"))),
    (
        "relu-y-shape",
        ValueError,
        "y",
        _set(saved=lambda a: a["saved"]._replace(activation="relu"), y=lambda a: a["x"][:2]),
    ),
    (
        "relu-y-dtype",
        TypeError,
        "y",
        _set(saved=lambda a: a["saved"]._replace(activation="relu"), y=lambda a: a["x"].astype(np.int32)),
    ),
    ("ghost-saved-mean-shape", ValueError, "saved", _set(saved=lambda a: a["saved"]._replace(virtual_batch_size=2))),
    (
        "ghost-not-divisor",
        ValueError,
        "virtual_batch_size",
        _set(saved=lambda a: a["saved"]._replace(virtual_batch_size=3)),
    ),
    (
        "renorm-r-shape",
        ValueError,
        "saved",
        _set(
            saved=lambda a: a["saved"]._replace(
                r=np.ones(C + 1, a["saved"].mean.dtype), d=np.zeros(C + 1, a["saved"].mean.dtype)
            )
        ),
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", BACKWARD_ERRORS, ids=[c[0] for c in BACKWARD_ERRORS])
def test_backward_rejects(case, dtype):
    _, exc, argument, change = case
    args = change(_forward_for_backward(dtype))
    with pytest.raises(exc, match=names(argument)):
        fastbn.backward(args["dy"], args["x"], args["weight"], args["saved"], axis=args["axis"], y=args.get("y"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_accepts_saved_with_equivalent_axis(dtype):
    """Near-miss of saved-other-axis: the channel axis spelled negatively in backward (-2) is
    the axis forward saved (1), so the Saved is consistent."""
    args = _forward_for_backward(dtype, axis=1, shape=(4, C, C))
    dx, dweight, dbias = fastbn.backward(args["dy"], args["x"], args["weight"], args["saved"], axis=-2)
    assert dx.shape == args["x"].shape and dweight.shape == (C,) and dbias.shape == (C,)


# --------------------------------------------------------------------------- moments, normalize
MOMENTS_ERRORS = [
    ("x-int", TypeError, "x", dict(x=np.ones((4, C), np.int32))),
    ("x-complex", TypeError, "x", dict(x=np.ones((4, C), np.complex128))),
    ("x-bool", TypeError, "x", dict(x=np.ones((4, C), bool))),
    ("x-1d", ValueError, "x", dict(x=np.ones(4), axis=0)),
    ("axis-out-of-range", ValueError, "axis", dict(x=np.ones((4, C)), axis=2)),
    ("axis-too-negative", ValueError, "axis", dict(x=np.ones((4, C)), axis=-3)),
    ("axis-str", TypeError, "axis", dict(x=np.ones((4, C)), axis="0")),
    ("no-channels", ValueError, "x", dict(x=np.ones((4, 0)))),
    ("no-channels-empty-batch", ValueError, "x", dict(x=np.ones((0, 0)))),
]


@pytest.mark.parametrize("case", MOMENTS_ERRORS, ids=[c[0] for c in MOMENTS_ERRORS])
def test_moments_rejects(case):
    _, exc, argument, kwargs = case
    with pytest.raises(exc, match=names(argument)):
        fastbn.moments(**kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape, axis", [((0, C), 1), ((0, C), None), ((4, C, 0), 1), ((C, 0), 0), ((0, 2, C), -1)], ids=str
)
def test_moments_of_an_empty_batch_are_nan(shape, axis, dtype):
    """An empty batch (used to be refused): NaN mean and variance per channel, as NumPy and TensorFlow give."""
    mean, var = fastbn.moments(np.ones(shape, dtype), axis=axis)
    for stat in (mean, var):
        assert stat.dtype == stats_dtype(dtype) and stat.shape == (shape[1 if axis is None else axis],)
        assert np.isnan(stat).all(), stat


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_axis_none_is_the_default_channel_axis_1(dtype):
    """moments and normalize take axis=None for their default channel axis, 1 (it used to be refused)."""
    args = good_normalize_args(dtype)
    x, params = args["x"], [args[k] for k in ("mean", "var", "weight", "bias")]
    for a, b in zip(fastbn.moments(x, axis=None), fastbn.moments(x, axis=1)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fastbn.normalize(x, *params, axis=None), fastbn.normalize(x, *params, axis=1))


def good_normalize_args(dtype):
    args = good_forward_args(dtype)
    return dict(
        x=args["x"],
        mean=args["running_mean"],
        var=args["running_var"],
        weight=args["weight"],
        bias=args["bias"],
        eps=1e-5,
        axis=1,
    )


# x is (4, C, 5) with channel axis 1: parameters are (C,), or broadcast to x varying along axis 1 only
NORMALIZE_ERRORS = [
    ("x-int", TypeError, "x", _set(x=lambda a: a["x"].astype(np.int16))),
    ("x-1d", ValueError, "x", _set(x=lambda a: a["x"][0, 0], axis=0)),
    ("axis-out-of-range", ValueError, "axis", _set(axis=-4)),
    ("no-channels", ValueError, "x", _set(x=lambda a: a["x"][:, :0])),
    ("mean-shape", ValueError, "mean", _reshape("mean", lambda c: (c + 1,))),
    ("mean-int", TypeError, "mean", _retype("mean", np.int64)),
    ("var-shape", ValueError, "var", _reshape("var", lambda c: (c, 2))),  # varies along the last axis too
    ("var-bool", TypeError, "var", _set(var=lambda a: a["var"] > 0)),
    ("var-negative", ValueError, "var", _set(var=lambda a: -a["var"])),
    ("weight-shape", ValueError, "weight", _reshape("weight", lambda c: (c - 1,))),
    ("weight-row", ValueError, "weight", _reshape("weight", lambda c: (1, c))),  # C on the last axis, not axis 1
    ("weight-complex", TypeError, "weight", _retype("weight", np.complex64)),
    ("bias-int", TypeError, "bias", _retype("bias", np.int32)),
    ("bias-more-axes-than-x", ValueError, "bias", _reshape("bias", lambda c: (1, c, 1, 1))),
    ("eps-zero", ValueError, "eps", _set(eps=0.0)),
    ("eps-nan", ValueError, "eps", _set(eps=float("nan"))),
    ("empty-batch-mean-shape", ValueError, "mean", _set(x=lambda a: a["x"][:0], mean=lambda a: a["mean"][:-1])),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", NORMALIZE_ERRORS, ids=[c[0] for c in NORMALIZE_ERRORS])
def test_normalize_rejects(case, dtype):
    _, exc, argument, change = case
    args = change(good_normalize_args(dtype))
    with pytest.raises(exc, match=names(argument)):
        fastbn.normalize(args.pop("x"), args.pop("mean"), args.pop("var"), args.pop("weight"), args.pop("bias"), **args)


def _matrix(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(a)


def _all_parameters(f):
    return lambda a: {**a, **{k: f(a[k]) for k in ("mean", "var", "weight", "bias")}}


# (id, change to the good arguments): what normalize now accepts (as TensorFlow and Keras do) and used to refuse
NORMALIZE_ACCEPTED = [
    ("mean-other-float", _retype("mean")),
    ("var-other-float", _retype("var")),
    ("weight-other-float", _retype("weight")),
    ("bias-float16", _retype("bias", np.float16)),
    ("mean-bfloat16", _retype("mean", BFLOAT16)),
    ("var-column", _reshape("var", lambda c: (c, 1))),  # (C, 1) of (N, C, L): along axis 1
    ("keepdims", _all_parameters(lambda p: p.reshape(1, -1, 1))),
    ("lists", _all_parameters(lambda p: p.tolist())),
    ("scalars", _set(mean=0.5, var=np.float16(2.0), weight=np.array(1.5), bias=[0.25])),
    (
        "channels-last-row",
        lambda a: _all_parameters(lambda p: p.reshape(1, -1))(
            {**a, "x": np.ascontiguousarray(a["x"].transpose(0, 2, 1)), "axis": -1}
        ),
    ),
    ("nc-matrix-row", _set(x=lambda a: a["x"][:, :, 0], weight=lambda a: _matrix(a["weight"]))),
    ("empty-batch", _set(x=lambda a: a["x"][:0])),
    ("empty-length", _set(x=lambda a: a["x"][:, :, :0], mean=lambda a: a["mean"].reshape(-1, 1))),
    ("axis-none", _set(axis=None)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", NORMALIZE_ACCEPTED, ids=[c[0] for c in NORMALIZE_ACCEPTED])
def test_normalize_accepts(case, dtype):
    """Any floating parameters, rounded to the stats dtype; shapes that broadcast along the channel axis; empty
    batches (an empty output); axis=None for axis 1: the result is the oracle's for the per-channel values."""
    _, change = case
    args = change(good_normalize_args(dtype))
    x, params = args.pop("x"), [args.pop(k) for k in ("mean", "var", "weight", "bias")]
    y = fastbn.normalize(x, *params, **args)
    assert type(y) is np.ndarray and y.shape == x.shape and y.dtype == x.dtype
    if x.size == 0:
        return
    axis = 1 if args["axis"] is None else args["axis"]
    sd, channels = stats_dtype(dtype), x.shape[axis]
    # each case's parameter holds one value or C, in channel order: as (C,), rounded to the stats dtype
    mean, var, w, b = (np.broadcast_to(np.asarray(p, np.float64).reshape(-1), (channels,)).astype(sd) for p in params)
    eps = args["eps"]
    expected = oracle_normalize(x, mean, var, w, b, eps=eps, axis=axis)
    invstd = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    scale = y_scale(x, mean, invstd, w, b, axis, stats_tol(dtype))
    assert_close(y, expected, output_tol(dtype), scale=scale, what="y")


# --------------------------------------------------------------------------- fold
def good_fold_args(dtype):
    rng = np.random.default_rng(0)
    sd = stats_dtype(dtype)
    return dict(
        layer_weight=rng.standard_normal((C, 4, 3, 3)).astype(dtype),
        layer_bias=rng.standard_normal(C).astype(dtype),
        running_mean=rng.normal(size=C).astype(sd),
        running_var=rng.uniform(0.5, 2.0, C).astype(sd),
        weight=rng.uniform(0.5, 2.0, C).astype(sd),
        bias=rng.normal(size=C).astype(sd),
        eps=1e-5,
        axis=0,
    )


FOLD_ERRORS = [
    ("layer_weight-int", TypeError, "layer_weight", _set(layer_weight=lambda a: a["layer_weight"].astype(np.int32))),
    ("layer_weight-1d", ValueError, "layer_weight", _set(layer_weight=lambda a: a["layer_weight"][:, 0, 0, 0])),
    ("layer_bias-shape", ValueError, "layer_bias", _reshape("layer_bias", lambda c: (c + 1,))),
    (
        "layer_bias-dtype",
        TypeError,
        "layer_bias",
        _set(
            layer_bias=lambda a: a["layer_bias"].astype(
                np.float64 if a["layer_bias"].dtype != np.float64 else np.float32
            )
        ),
    ),
    ("running_mean-missing", TypeError, "running_mean", _set(running_mean=None)),
    ("running_var-shape", ValueError, "running_var", _reshape("running_var", lambda c: (c - 1,))),
    ("weight-dtype", TypeError, "weight", _retype("weight")),
    ("bias-shape", ValueError, "bias", _reshape("bias", lambda c: (1, c))),
    ("eps-negative", ValueError, "eps", _set(eps=-1.0)),
    ("axis-out-of-range", ValueError, "axis", _set(axis=4)),
    ("axis-wrong-channels", ValueError, "layer_bias", _set(axis=1)),
    ("axis-wrong-channels-no-bias", ValueError, "running_mean", _set(axis=1, layer_bias=None)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", FOLD_ERRORS, ids=[c[0] for c in FOLD_ERRORS])
def test_fold_rejects(case, dtype):
    _, exc, argument, change = case
    args = change(good_fold_args(dtype))
    snapshot = _snapshot(*args.values())
    with pytest.raises(exc, match=names(argument)):
        fastbn.fold(**args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fold_accepts_the_good_arguments_and_their_near_misses(dtype):
    for change in (
        _set(),
        _set(layer_bias=None),
        _set(weight=None, bias=None),
        _set(layer_weight=lambda a: np.ascontiguousarray(np.moveaxis(a["layer_weight"], 0, -1)), axis=-1),
    ):
        args = change(good_fold_args(dtype))
        folded_weight, folded_bias = fastbn.fold(**args)
        assert folded_weight.shape == args["layer_weight"].shape and folded_bias.shape == (C,)


@pytest.mark.parametrize("kind", ["list", "tuple", "array-like"])
def test_fold_reads_running_statistics_given_as_sequences_as_any_input(kind):
    """fold only reads the running statistics: a list is taken, as weight and bias are (it was refused as an
    update that would be lost, which fold makes none of)."""

    class ArrayLike:
        def __init__(self, values):
            self.values = values

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.values, dtype=dtype)

    convert = {"list": list, "tuple": tuple, "array-like": ArrayLike}[kind]
    args = good_fold_args(np.float64)
    expected = fastbn.fold(**args)
    got = fastbn.fold(
        **{
            **args,
            "running_mean": convert(args["running_mean"].tolist()),
            "running_var": convert(args["running_var"].tolist()),
        }
    )
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
