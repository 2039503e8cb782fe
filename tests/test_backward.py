"""backward against the float64 oracle (every dtype, layout and mode) and, in float64,
against central finite differences of the oracle's forward."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastbn

from oracle import oracle_backward, oracle_forward, oracle_moments, per_channel, reduce_axes
from strategies import (
    EPSILONS,
    FD_TOL,
    assert_close,
    backward_scales,
    cases,
    forward_inputs,
    layouts,
    like,
    make_params,
    output_tol,
    stats_tol,
)


@given(forward_inputs(), st.data())
def test_backward_matches_oracle(inp, data):
    case, p = inp.case, inp.params
    x = case.x
    rm, rv = inp.running_copies()
    _y, saved = fastbn.forward(
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
    # dy gets a layout of its own: it need not share x's strides
    dy = like(case, case.rng(2).standard_normal(x.shape), layout=data.draw(layouts(x.ndim), label="dy layout"))
    x_before, dy_before = x.copy(), dy.copy()
    # the channel axis may be spelled the other way (negative vs non-negative) than in forward
    axis = data.draw(st.sampled_from((case.channel, case.channel - x.ndim)), label="backward axis")

    dx, dweight, dbias = fastbn.backward(dy, x, p.weight, saved, axis=axis)

    o = oracle_forward(
        x,
        p.weight,
        p.bias,
        running_mean=p.running_mean,
        running_var=p.running_var,
        training=inp.training,
        eps=inp.eps,
        axis=case.axis,
    )
    e_dx, e_dweight, e_dbias = oracle_backward(dy, x, p.weight, o.mean, o.invstd, o.batch_stats, case.axis)

    assert isinstance(dx, np.ndarray) and dx.dtype == case.dtype and dx.shape == x.shape
    for name, arr in (("dweight", dweight), ("dbias", dbias)):  # returned even when weight is None
        assert isinstance(arr, np.ndarray) and arr.dtype == case.sdtype and arr.shape == (case.channels,), name
    st_tol = stats_tol(case.dtype)
    dx_scale, dweight_scale, dbias_scale = backward_scales(x, dy, o.mean, o.invstd, p.weight, case.axis, st_tol)
    mode = "training" if o.batch_stats else "eval"
    assert_close(dx, e_dx, output_tol(case.dtype), scale=dx_scale, what=f"dx ({mode})")
    assert_close(dweight, e_dweight, st_tol, scale=dweight_scale, what=f"dweight ({mode})")
    assert_close(dbias, e_dbias, st_tol, scale=dbias_scale, what=f"dbias ({mode})")
    assert np.array_equal(x, x_before) and np.array_equal(dy, dy_before)


def _numerical_gradients(forward, R, x, weight, bias, h_x):
    """Central differences of loss = sum(forward(x, weight, bias) * R) with respect to every
    element of x, weight and bias.  Each difference is taken of y, elementwise, before the sum
    with R, so the rounding of the whole loss (and of the channels not perturbed, which cancel
    exactly) does not swamp a small difference; h_x is an array of x's shape (per-channel steps)."""
    grads = []
    h_w = np.full(weight.shape, 1e-5)
    for which, arr, steps in ((0, x, h_x), (1, weight, h_w), (2, bias, h_w)):
        grad = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            args_plus, args_minus = [x, weight, bias], [x, weight, bias]
            args_plus[which], args_minus[which] = arr.copy(), arr.copy()
            args_plus[which][idx] += steps[idx]
            args_minus[which][idx] -= steps[idx]
            grad[idx] = np.sum((forward(*args_plus) - forward(*args_minus)) * R) / (2 * steps[idx])
        grads.append(grad)
    return grads


@given(
    cases(
        dtypes=(np.float64,),
        max_elems=40,
        allow_large=False,
        max_rank=4,
        offset_ratios=(0.0, 1.0, 5.0),
        scale_exponents=(-1, 1),
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(EPSILONS),
)
def test_backward_matches_finite_differences(case, training, running, has_weight, eps):
    """float64: backward is the gradient of forward, d/dx sum(y * R) for a random R."""
    p = make_params(case, weight=has_weight, bias=True, running=running)
    x = case.x
    R = case.rng(3).standard_normal(x.shape)
    rm, rv = (None, None) if not running else (p.running_mean.copy(), p.running_var.copy())
    _, saved = fastbn.forward(
        x, p.weight, p.bias, running_mean=rm, running_var=rv, training=training, eps=eps, axis=case.axis
    )
    dx, dweight, dbias = fastbn.backward(R, x, p.weight, saved, axis=case.axis)

    def forward(xv, wv, bv):
        return oracle_forward(
            xv,
            wv,
            bv,
            running_mean=p.running_mean,
            running_var=p.running_var,
            training=training,
            eps=eps,
            axis=case.axis,
        ).y

    # The step is 1e-5 of each channel's sqrt(var + eps), the scale on which y curves: a fixed
    # step is too coarse for a channel whose few values happen to lie close together.
    _, var = oracle_moments(x, case.axis)
    h_x = np.broadcast_to(per_channel(1e-5 * np.sqrt(var + eps), x.ndim, case.axis), x.shape)
    weight = np.ones(case.channels) if p.weight is None else p.weight.astype(np.float64)
    fd_dx, fd_dweight, fd_dbias = _numerical_gradients(forward, R, np.array(x, np.float64), weight, p.bias.copy(), h_x)

    # Per-channel scales: the size each gradient would have without cancellation, so that a
    # gradient that cancels to ~0 (e.g. two elements per channel) is compared at the precision
    # of its terms.
    o = oracle_forward(
        x,
        p.weight,
        p.bias,
        running_mean=p.running_mean,
        running_var=p.running_var,
        training=training,
        eps=eps,
        axis=case.axis,
    )
    nd, axes = x.ndim, reduce_axes(x.ndim, case.axis)
    y_hat = np.abs((x - per_channel(o.mean, nd, case.axis)) * per_channel(o.invstd, nd, case.axis))
    dx_scale = np.max(np.abs(R), axis=axes) * o.invstd * np.abs(weight) * (1 + np.max(y_hat, axis=axes))
    assert_close(dx, fd_dx, FD_TOL, scale=per_channel(dx_scale, nd, case.axis), what="dx vs finite differences")
    assert_close(
        dweight, fd_dweight, FD_TOL, scale=np.sum(np.abs(R) * y_hat, axis=axes), what="dweight vs finite differences"
    )
    assert_close(dbias, fd_dbias, FD_TOL, scale=np.sum(np.abs(R), axis=axes), what="dbias vs finite differences")
