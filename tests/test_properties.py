"""Mathematical properties of batch norm that hold whatever the oracle says: output
statistics, affine invariance, zero-sum gradients, running-stat bookkeeping, and the
equivalences between optional arguments."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn

from oracle import oracle_forward, oracle_moments, per_channel, reduce_axes
from strategies import (
    allowed_error,
    assert_close,
    assert_within,
    backward_scales,
    cases,
    conditioning,
    forward_inputs,
    layouts,
    like,
    make_params,
    mean_scale,
    output_tol,
    stats_tol,
    unit_roundoff,
    var_scale,
    y_scale,
)


def _negligible_eps(case, factor=1.0):
    """An eps so small against every channel's variance that it changes nothing in any dtype
    (relative effect < 1e-14), rejecting the rare near-constant channel (half rounding)."""
    _, var = oracle_moments(case.x, case.axis)
    assume(np.all(var > 1e-6 * (factor * case.scale) ** 2))
    return 1e-20 * (factor * case.scale) ** 2


def _y_allowed(case, y_expected, mean, invstd, weight, bias):
    """Elementwise error allowed for an output y of the implementation (see strategies)."""
    scale = y_scale(case.x, mean, invstd, weight, bias, case.axis, stats_tol(case.dtype))
    return allowed_error(y_expected, output_tol(case.dtype), scale)


@given(forward_inputs(training=True, weight=True, bias=True))
def test_output_mean_is_bias_and_std_is_abs_weight(inp):
    case, p = inp.case, inp.params
    eps = _negligible_eps(case)
    rm, rv = inp.running_copies()
    y, _ = fastbn.forward(case.x, p.weight, p.bias, running_mean=rm, running_var=rv, eps=eps, axis=case.axis)
    axes = reduce_axes(y.ndim, case.axis)
    y64 = y.astype(np.float64)
    o = oracle_forward(case.x, p.weight, p.bias, eps=eps, axis=case.axis)
    # mean and (biased) std move by at most the largest error of any element of the channel
    allowed = np.max(_y_allowed(case, o.y, o.mean, o.invstd, p.weight, p.bias), axis=axes)
    assert_within(y64.mean(axis=axes), p.bias, allowed, "per-channel mean of y vs bias")
    assert_within(y64.std(axis=axes), np.abs(p.weight), allowed, "per-channel std of y vs |weight|")


@st.composite
def affine_maps(draw, case):
    """(a, b): a > 0 scalar, b per channel.  Half: a a power of two and b = 0, so that a*x + b
    is exact and no rounding of the test's own making swamps half's precision."""
    if case.dtype == np.float16:
        return 2.0 ** draw(st.integers(-2, 2)), np.zeros(case.channels)
    a = 10.0 ** draw(st.floats(-2, 2))
    b = a * case.scale * case.rng(4).uniform(-1, 1, case.channels) * draw(st.sampled_from((0.0, 1.0, 10.0)))
    return a, b


@given(forward_inputs(training=True), st.data())
def test_training_output_invariant_under_positive_affine_map(inp, data):
    case, p = inp.case, inp.params
    a, b = data.draw(affine_maps(case), label="a, b")
    eps = _negligible_eps(case, factor=min(1.0, a))
    x2 = like(case, a * case.x.astype(np.float64) + per_channel(b, case.x.ndim, case.axis))
    y1, _ = fastbn.forward(case.x, p.weight, p.bias, eps=eps, axis=case.axis)
    y2, _ = fastbn.forward(x2, p.weight, p.bias, eps=eps, axis=case.axis)

    o1 = oracle_forward(case.x, p.weight, p.bias, eps=eps, axis=case.axis)
    o2 = oracle_forward(x2, p.weight, p.bias, eps=eps, axis=case.axis)
    # Each output is within its own tolerance of the exact result; x2 holds a*x + b rounded
    # to x's dtype (error <= u |x2|), which moves y_hat by ~u * K2 * (1 + |y_hat|) at most twice.
    nd = case.x.ndim
    w = np.ones(case.channels) if p.weight is None else np.abs(p.weight.astype(np.float64))
    k2 = conditioning(x2, o2.mean, o2.invstd, case.axis)
    y_hat = (case.x - per_channel(o1.mean, nd, case.axis)) * per_channel(o1.invstd, nd, case.axis)
    rounding = 4 * unit_roundoff(case.dtype) * per_channel(k2 * w, nd, case.axis) * (1 + np.abs(y_hat))
    allowed = (
        _y_allowed(case, o1.y, o1.mean, o1.invstd, p.weight, p.bias)
        + _y_allowed(case, o2.y, o2.mean, o2.invstd, p.weight, p.bias)
        + rounding
    )
    assert_within(y2, y1.astype(np.float64), allowed, f"y(a*x + b) vs y(x), a={a:g}")


@given(forward_inputs(weight=False), st.booleans(), st.data())
def test_dx_sums_to_zero_per_channel_with_unit_weight(inp, explicit_ones, data):
    """With batch statistics and weight 1, sum_c dx = invstd (sum dy - sum dy - k sum(x - mean)) = 0."""
    case, p = inp.case, inp.params
    assume(inp.training or p.running_mean is None)  # batch statistics are used
    weight = np.ones(case.channels, case.sdtype) if explicit_ones else None
    rm, rv = inp.running_copies()
    _, saved = fastbn.forward(
        case.x, weight, p.bias, running_mean=rm, running_var=rv, training=inp.training, eps=inp.eps, axis=case.axis
    )
    dy = like(case, case.rng(2).standard_normal(case.x.shape), layout=data.draw(layouts(case.x.ndim)))
    dx, _, _ = fastbn.backward(dy, case.x, weight, saved, axis=case.axis)
    o = oracle_forward(case.x, eps=inp.eps, axis=case.axis)
    st_tol = stats_tol(case.dtype)
    dx_scale, _, _ = backward_scales(case.x, dy, o.mean, o.invstd, None, case.axis, st_tol)
    axes = reduce_axes(case.x.ndim, case.axis)
    # the sum can be off by the sum of the errors allowed to its terms
    allowed = np.sum(allowed_error(dx, output_tol(case.dtype), dx_scale), axis=axes)
    assert_within(np.sum(dx.astype(np.float64), axis=axes), np.zeros(case.channels), allowed, "per-channel sum of dx")


@given(cases())
def test_running_stats_over_several_batches(case):
    """Three training steps, each on a different batch (x, 2x + 1, -x), accumulate like the oracle,
    in place in the caller's arrays."""
    p = make_params(case, weight=False, bias=False)
    rm, rv = p.running_mean.copy(), p.running_var.copy()
    rm_id, rv_id = id(rm), id(rv)
    e_rm, e_rv = p.running_mean.astype(np.float64), p.running_var.astype(np.float64)
    scale_rm, scale_rv = np.abs(e_rm), np.abs(e_rv)
    tol = stats_tol(case.dtype)
    for step, (a, b) in enumerate(((1.0, 0.0), (2.0, 1.0), (-1.0, 0.0))):
        x = like(case, a * case.x.astype(np.float64) + b)
        out = fastbn.forward(x, running_mean=rm, running_var=rv, momentum=0.25, axis=case.axis)
        o = oracle_forward(x, running_mean=e_rm, running_var=e_rv, momentum=0.25, axis=case.axis)
        e_rm, e_rv = o.running_mean, o.running_var
        mean, var = oracle_moments(x, case.axis)
        n = case.count
        scale_rm = 0.75 * scale_rm + 0.25 * mean_scale(x, mean, case.axis)
        scale_rv = 0.75 * scale_rv + 0.25 * n / (n - 1) * var_scale(x, mean, var, case.axis, tol)
        assert len(out) == 2
        assert_close(rm, e_rm, tol, scale=scale_rm, what=f"running_mean after step {step}")
        assert_close(rv, e_rv, tol, scale=scale_rv, what=f"running_var after step {step}")
    assert id(rm) == rm_id and id(rv) == rv_id and rm.dtype == case.sdtype and rv.dtype == case.sdtype


@given(forward_inputs(training=True, running=True), st.sampled_from((0.0, 1.0)))
def test_momentum_extremes(inp, momentum):
    """momentum 0 keeps the running stats bit for bit; momentum 1 replaces them with the batch's
    mean and unbiased variance."""
    case, p = inp.case, inp.params
    rm, rv = inp.running_copies()
    fastbn.forward(
        case.x, p.weight, p.bias, running_mean=rm, running_var=rv, momentum=momentum, eps=inp.eps, axis=case.axis
    )
    if momentum == 0.0:
        assert rm.tobytes() == p.running_mean.tobytes() and rv.tobytes() == p.running_var.tobytes()
    else:
        tol = stats_tol(case.dtype)
        mean, var = oracle_moments(case.x, case.axis)
        n = case.count
        assert_close(rm, mean, tol, scale=mean_scale(case.x, mean, case.axis), what="running_mean (momentum 1)")
        assert_close(
            rv,
            var * n / (n - 1),
            tol,
            scale=n / (n - 1) * var_scale(case.x, mean, var, case.axis, tol),
            what="running_var (momentum 1) = unbiased batch variance",
        )


@given(forward_inputs(running=False))
def test_eval_without_running_stats_uses_batch_statistics(inp):
    """training=False with no running stats normalises with the batch (PyTorch's
    track_running_stats=False) and saves batch_stats=True, like training does."""
    case, p = inp.case, inp.params
    y_train, s_train = fastbn.forward(case.x, p.weight, p.bias, training=True, eps=inp.eps, axis=case.axis)
    y_eval, s_eval = fastbn.forward(case.x, p.weight, p.bias, training=False, eps=inp.eps, axis=case.axis)
    assert bool(s_eval.batch_stats) and bool(s_train.batch_stats)
    o = oracle_forward(case.x, p.weight, p.bias, eps=inp.eps, axis=case.axis)
    assert_within(
        y_eval,
        y_train.astype(np.float64),
        2 * _y_allowed(case, o.y, o.mean, o.invstd, p.weight, p.bias),
        "y(training=False, no running stats) vs y(training=True)",
    )


@given(forward_inputs())
def test_missing_weight_and_bias_mean_one_and_zero(inp):
    case, p = inp.case, inp.params
    ones, zeros = np.ones(case.channels, case.sdtype), np.zeros(case.channels, case.sdtype)
    kwargs = dict(training=inp.training, momentum=inp.momentum, eps=inp.eps, axis=case.axis)
    rm1, rv1 = inp.running_copies()
    rm2, rv2 = inp.running_copies()
    y1, s1 = fastbn.forward(case.x, None, None, running_mean=rm1, running_var=rv1, **kwargs)
    y2, s2 = fastbn.forward(case.x, ones, zeros, running_mean=rm2, running_var=rv2, **kwargs)
    o = oracle_forward(case.x, running_mean=p.running_mean, running_var=p.running_var, **kwargs)
    assert_within(
        y1,
        y2.astype(np.float64),
        2 * _y_allowed(case, o.y, o.mean, o.invstd, None, None),
        "y(weight=None, bias=None) vs y(ones, zeros)",
    )
    dy = like(case, case.rng(2).standard_normal(case.x.shape))
    g1 = fastbn.backward(dy, case.x, None, s1, axis=case.axis)
    g2 = fastbn.backward(dy, case.x, ones, s2, axis=case.axis)
    dx_scale, dw_scale, db_scale = backward_scales(case.x, dy, o.mean, o.invstd, None, case.axis, stats_tol(case.dtype))
    for name, a, b, tol, scale in (
        ("dx", g1[0], g2[0], output_tol(case.dtype), dx_scale),
        ("dweight", g1[1], g2[1], stats_tol(case.dtype), dw_scale),
        ("dbias", g1[2], g2[2], stats_tol(case.dtype), db_scale),
    ):
        assert_within(a, b.astype(np.float64), 2 * allowed_error(b, tol, scale), f"{name}(weight=None) vs {name}(ones)")
