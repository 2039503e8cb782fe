"""forward, moments and normalize against the float64 oracle, over every dtype, rank,
channel axis (negative too), memory layout and combination of optional parameters."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastbn

from oracle import oracle_forward, oracle_moments, oracle_normalize
from strategies import (
    EPSILONS,
    Case,
    assert_close,
    cases,
    forward_inputs,
    invstd_scale,
    make_params,
    mean_scale,
    output_tol,
    stats_tol,
    var_scale,
    y_scale,
)


@given(forward_inputs())
def test_forward_matches_oracle(inp):
    case, p = inp.case, inp.params
    x = case.x
    x_before = x.copy()
    weight_before = None if p.weight is None else p.weight.copy()
    bias_before = None if p.bias is None else p.bias.copy()
    rm, rv = inp.running_copies()

    y, saved = fastbn.forward(
        x,
        p.weight,
        p.bias,
        running_mean=rm,
        running_var=rv,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
    )
    o = oracle_forward(
        x,
        p.weight,
        p.bias,
        running_mean=p.running_mean,
        running_var=p.running_var,
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
    )
    out_tol, st_tol = output_tol(case.dtype), stats_tol(case.dtype)

    # y: x's dtype and shape, values within the conditioning-scaled tolerance.
    assert isinstance(y, np.ndarray) and y.dtype == case.dtype and y.shape == x.shape
    assert_close(y, o.y, out_tol, scale=y_scale(x, o.mean, o.invstd, p.weight, p.bias, case.axis, st_tol), what="y")

    # saved: the documented NamedTuple, statistics of the stats dtype.
    assert isinstance(saved, fastbn.Saved)
    assert isinstance(saved.batch_stats, (bool, np.bool_)) and bool(saved.batch_stats) == o.batch_stats
    assert saved.count == case.count and saved.shape == x.shape and saved.axis == case.channel
    for name in ("mean", "invstd"):
        arr = getattr(saved, name)
        assert arr.dtype == case.sdtype and arr.shape == (case.channels,), (name, arr.dtype, arr.shape)
    assert_close(saved.mean, o.mean, st_tol, scale=mean_scale(x, o.mean, case.axis), what="saved.mean")
    assert_close(
        saved.invstd, o.invstd, st_tol, scale=invstd_scale(x, o.mean, o.invstd, case.axis, st_tol), what="saved.invstd"
    )

    # running stats: updated in place in training, bit-for-bit untouched otherwise.
    if p.running_mean is not None:
        assert rm.dtype == case.sdtype and rv.dtype == case.sdtype
        if inp.training:
            m, n = inp.momentum, case.count
            mean, var = oracle_moments(x, case.axis)
            assert_close(
                rm,
                o.running_mean,
                st_tol,
                scale=np.abs(p.running_mean) + m * mean_scale(x, mean, case.axis),
                what="running_mean",
            )
            assert_close(
                rv,
                o.running_var,
                st_tol,
                scale=np.abs(p.running_var) + m * n / (n - 1) * var_scale(x, mean, var, case.axis, st_tol),
                what="running_var",
            )
        else:
            assert rm.tobytes() == p.running_mean.tobytes() and rv.tobytes() == p.running_var.tobytes()

    # inputs are not modified
    assert np.array_equal(x, x_before)
    if p.weight is not None:
        assert p.weight.tobytes() == weight_before.tobytes()
    if p.bias is not None:
        assert p.bias.tobytes() == bias_before.tobytes()


@given(cases())
def test_moments_matches_oracle(case: Case):
    mean, var = fastbn.moments(case.x, axis=case.axis)
    o_mean, o_var = oracle_moments(case.x, case.axis)
    for name, arr in (("mean", mean), ("var", var)):
        assert isinstance(arr, np.ndarray) and arr.dtype == case.sdtype and arr.shape == (case.channels,), name
    tol = stats_tol(case.dtype)
    assert_close(mean, o_mean, tol, scale=mean_scale(case.x, o_mean, case.axis), what="moments mean")
    assert_close(var, o_var, tol, scale=var_scale(case.x, o_mean, o_var, case.axis, tol), what="moments var (biased)")
    assert np.all(var >= 0)


@given(cases(min_count=1), st.booleans(), st.booleans(), st.sampled_from(EPSILONS))
def test_normalize_matches_oracle(case: Case, has_weight, has_bias, eps):
    p = make_params(case, weight=has_weight, bias=has_bias)
    # normalise with arbitrary given statistics (the running ones of make_params)
    mean, var = p.running_mean, p.running_var
    y = fastbn.normalize(case.x, mean, var, p.weight, p.bias, eps=eps, axis=case.axis)
    expected = oracle_normalize(case.x, mean, var, p.weight, p.bias, eps=eps, axis=case.axis)
    assert isinstance(y, np.ndarray) and y.dtype == case.dtype and y.shape == case.x.shape
    invstd = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    scale = y_scale(case.x, mean.astype(np.float64), invstd, p.weight, p.bias, case.axis, stats_tol(case.dtype))
    assert_close(y, expected, output_tol(case.dtype), scale=scale, what="normalize y")


@given(forward_inputs(training=True))
def test_normalize_of_moments_equals_training_forward(inp):
    """The halves compose to the whole: normalize(x, *moments(x)) == forward(x) in training."""
    case, p = inp.case, inp.params
    rm, rv = inp.running_copies()
    y, saved = fastbn.forward(
        case.x, p.weight, p.bias, running_mean=rm, running_var=rv, eps=inp.eps, momentum=inp.momentum, axis=case.axis
    )
    mean, var = fastbn.moments(case.x, axis=case.axis)
    y2 = fastbn.normalize(case.x, mean, var, p.weight, p.bias, eps=inp.eps, axis=case.axis)
    o = oracle_forward(case.x, p.weight, p.bias, eps=inp.eps, axis=case.axis)
    st_tol = stats_tol(case.dtype)
    # each is within one tolerance of the oracle, so within two of each other
    scale = 2 * y_scale(case.x, o.mean, o.invstd, p.weight, p.bias, case.axis, st_tol)
    assert_close(y2, y, output_tol(case.dtype), scale=scale, what="normalize(moments) vs forward y")
    assert_close(
        mean, saved.mean, st_tol, scale=2 * mean_scale(case.x, o.mean, case.axis), what="moments mean vs saved.mean"
    )
    assert_close(
        1.0 / np.sqrt(var.astype(np.float64) + inp.eps),
        saved.invstd,
        st_tol,
        scale=2 * invstd_scale(case.x, o.mean, o.invstd, case.axis, st_tol),
        what="moments var vs saved.invstd",
    )
