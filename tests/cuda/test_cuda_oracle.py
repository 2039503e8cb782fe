"""The GPU backend against the float64 oracle, with the CPU tests' strategies and tolerances.

Inputs are drawn as in tests/test_forward.py and tests/test_backward.py (every
dtype, rank, channel axis, memory layout and optional parameter), only
smaller, and handed to fastbn as GPU arrays; results must come back as device
arrays, running statistics must be updated in place on the device.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn
from fastbn.backends.cuda import target

from gpu_arrays import gpu, host, small_cases, small_forward_inputs
from oracle import oracle_backward, oracle_forward, oracle_moments, oracle_normalize
from strategies import (
    EPSILONS,
    assert_close,
    backward_scales,
    invstd_scale,
    layouts,
    like,
    make_params,
    mean_scale,
    output_tol,
    stats_tol,
    var_scale,
    y_scale,
)

# The simulator runs a few thousand CUDA threads a second: small examples, half as many as the
# profile asks of the CPU tests (15 with the default "ci" profile, 150 with "dev").
FEW = settings(max_examples=max(15, settings().max_examples // 2))


@FEW
@given(small_forward_inputs())
def test_forward_matches_oracle(inp):
    case, p = inp.case, inp.params
    x = case.x
    x_before = x.copy()
    rm, rv = inp.running_copies()
    rm_device, rv_device = gpu(rm), gpu(rv)

    y, saved = fastbn.forward(
        gpu(x),
        gpu(p.weight),
        gpu(p.bias),
        running_mean=rm_device,
        running_var=rv_device,
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

    y_host = host(y)
    assert y_host.dtype == case.dtype and y_host.shape == x.shape
    assert_close(
        y_host, o.y, out_tol, scale=y_scale(x, o.mean, o.invstd, p.weight, p.bias, case.axis, st_tol), what="y"
    )
    assert bool(saved.batch_stats) == o.batch_stats and saved.count == case.count and saved.axis == case.channel
    for name in ("mean", "invstd"):
        arr = getattr(saved, name)
        assert target.is_device_array(arr), (name, type(arr))
        assert arr.dtype == case.sdtype and tuple(arr.shape) == (case.channels,), name
    assert_close(host(saved.mean), o.mean, st_tol, scale=mean_scale(x, o.mean, case.axis), what="saved.mean")
    assert_close(
        host(saved.invstd),
        o.invstd,
        st_tol,
        scale=invstd_scale(x, o.mean, o.invstd, case.axis, st_tol),
        what="saved.invstd",
    )

    # Running statistics: updated in place on the device in training,
    # untouched otherwise.
    if p.running_mean is not None:
        rm, rv = host(rm_device), host(rv_device)
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
    assert np.array_equal(x, x_before, equal_nan=True)


@FEW
@given(small_cases())
def test_moments_matches_oracle(case):
    mean, var = fastbn.moments(gpu(case.x), axis=case.axis)
    o_mean, o_var = oracle_moments(case.x, case.axis)
    tol = stats_tol(case.dtype)
    mean, var = host(mean), host(var)
    assert mean.dtype == case.sdtype and var.dtype == case.sdtype
    assert_close(mean, o_mean, tol, scale=mean_scale(case.x, o_mean, case.axis), what="moments mean")
    assert_close(var, o_var, tol, scale=var_scale(case.x, o_mean, o_var, case.axis, tol), what="moments var")
    assert np.all(var >= 0)


@FEW
@given(small_cases(min_count=1), st.booleans(), st.booleans(), st.sampled_from(EPSILONS))
def test_normalize_matches_oracle(case, has_weight, has_bias, eps):
    p = make_params(case, weight=has_weight, bias=has_bias)
    mean, var = p.running_mean, p.running_var
    y = fastbn.normalize(gpu(case.x), gpu(mean), gpu(var), gpu(p.weight), gpu(p.bias), eps=eps, axis=case.axis)
    expected = oracle_normalize(case.x, mean, var, p.weight, p.bias, eps=eps, axis=case.axis)
    invstd = 1.0 / np.sqrt(var.astype(np.float64) + eps)
    scale = y_scale(case.x, mean.astype(np.float64), invstd, p.weight, p.bias, case.axis, stats_tol(case.dtype))
    y = host(y)
    assert y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, expected, output_tol(case.dtype), scale=scale, what="normalize y")


@FEW
@given(small_forward_inputs(), st.data())
def test_backward_matches_oracle(inp, data):
    """Backward after a GPU forward, training or eval; dy has a layout of its own."""
    case, p = inp.case, inp.params
    x = case.x
    rm, rv = inp.running_copies()
    _, saved = fastbn.forward(
        gpu(x),
        gpu(p.weight),
        gpu(p.bias),
        running_mean=gpu(rm),
        running_var=gpu(rv),
        training=inp.training,
        momentum=inp.momentum,
        eps=inp.eps,
        axis=case.axis,
    )
    dy = like(case, case.rng(2).standard_normal(x.shape), layout=data.draw(layouts(x.ndim), label="dy layout"))
    dx, dweight, dbias = fastbn.backward(gpu(dy), gpu(x), gpu(p.weight), saved, axis=case.axis)

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
    st_tol = stats_tol(case.dtype)
    dx_scale, dweight_scale, dbias_scale = backward_scales(x, dy, o.mean, o.invstd, p.weight, case.axis, st_tol)
    mode = "training" if o.batch_stats else "eval"
    dx = host(dx)
    assert dx.dtype == case.dtype and dx.shape == x.shape
    for name, arr in (("dweight", dweight), ("dbias", dbias)):
        assert arr.dtype == case.sdtype and tuple(arr.shape) == (case.channels,), name
    assert_close(dx, e_dx, output_tol(case.dtype), scale=dx_scale, what=f"dx ({mode})")
    assert_close(host(dweight), e_dweight, st_tol, scale=dweight_scale, what=f"dweight ({mode})")
    assert_close(host(dbias), e_dbias, st_tol, scale=dbias_scale, what=f"dbias ({mode})")
